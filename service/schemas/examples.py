"""The one module of example specs: the request examples the OpenAPI documentation shows (and
`examples/*.json` writes out), and the named models the tests and benches build theirs from."""

from typing import Any

RESNET50_A100: dict[str, Any] = {
    "model": {"source": "torchvision", "name": "resnet50", "kwargs": {"num_classes": 1000}},
    "data": {
        "kind": "image",
        "channels": 3,
        "height": 224,
        "width": 224,
        "layout": "channels_first",
        "num_classes": 1000,
        "num_samples": 1281167,
    },
    "training": {
        "optimizer": "sgd_momentum",
        "precision": "bf16-mixed",
        "gradient_checkpointing": False,
        "global_batch_size": 1024,
        "base_lr": 0.1,
        "base_batch_size": 256,
        "lr_scaling": "linear",
        "epochs": 90,
        "world_size": 1,
    },
    "device": {"kind": "simulated", "gpu": "A100-80GB"},
    "search": {"max_batch_size": 65536, "headroom": 0.09, "micro_batch": "power_of_two"},
}

SMALL_GRAYSCALE_CNN: dict[str, Any] = {
    "model": {
        "source": "layers",
        "layers": [
            {"type": "Conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
            {"type": "BatchNorm2d"},
            {"type": "ReLU"},
            {"type": "MaxPool2d", "kernel_size": 2},
            {"type": "Conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1},
            {"type": "BatchNorm2d"},
            {"type": "ReLU"},
            {"type": "AdaptiveAvgPool2d", "output_size": 1},
            {"type": "Flatten"},
            {"type": "Linear", "out_features": 10},
        ],
    },
    "data": {
        "kind": "image",
        "channels": 1,
        "height": 28,
        "width": 28,
        "num_classes": 10,
        "num_samples": 60000,
    },
    "training": {
        "optimizer": "adam",
        "precision": "fp32",
        "global_batch_size": 512,
        "base_lr": 0.001,
        "base_batch_size": 128,
        "epochs": 10,
    },
    "device": {"kind": "simulated", "gpu": "T4"},
}

RESNET50_FINE_TUNE: dict[str, Any] = {
    "model": {"source": "torchvision", "name": "resnet50", "kwargs": {"num_classes": 102}},
    "data": {
        "kind": "image",
        "channels": 3,
        "height": 224,
        "width": 224,
        "num_classes": 102,
        "num_samples": 8189,
    },
    "training": {
        "optimizer": "adamw",
        "optimizer_impl": "fused",
        "precision": "bf16-mixed",
        "global_batch_size": 128,
        "base_lr": 1e-3,
        "base_batch_size": 128,
        "epochs": 30,
        "schedule": {"name": "cosine", "warmup_ratio": 0.05, "min_lr_ratio": 0.01},
        "param_groups": [{"prefix": "fc.", "lr_scale": 10.0}],
        "early_stopping": {"monitor": "val_loss", "patience": 5},
    },
    "device": {"kind": "simulated", "gpu": "L4"},
}
# Llama-3.1-8B, LoRA, 32k tokens on an H100: with transformers' loss head the logits alone
# overflow the card; Liger's fused linear cross-entropy fits a micro-batch of one.
LONG_CONTEXT_LORA: dict[str, Any] = {
    "model": {"source": "transformers", "preset": "llama-3.1-8b"},
    "data": {"kind": "tokens", "seq_len": 32768, "num_samples": 10000},
    "training": {
        "precision": "bf16-mixed",
        "gradient_checkpointing": True,
        "peft": {"method": "lora", "r": 16},
        "loss_kernel": "liger",
        "global_batch_size": 8,
        "base_lr": 0.0002,
    },
    "device": {"kind": "simulated", "gpu": "H100-80GB"},
    "search": {"what_if": False},
}

PLAN_EXAMPLES: dict[str, Any] = {
    "resnet50": {"summary": "ResNet-50 on ImageNet, A100-80GB, bf16-mixed", "value": RESNET50_A100},
    "grayscale_cnn": {
        "summary": "A small grayscale CNN from layers, T4",
        "value": SMALL_GRAYSCALE_CNN,
    },
    "fine_tune": {
        "summary": "Fine-tune ResNet-50: cosine schedule, a 10x head, early stopping, fused AdamW",
        "value": RESNET50_FINE_TUNE,
    },
    "long_context_lora": {
        "summary": "Llama-3.1-8B LoRA at 32k tokens, H100, Liger's fused loss head",
        "value": LONG_CONTEXT_LORA,
    },
}


def response_example(
    status: int, body: Any, description: str = "", media_type: str = "application/json"
) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI `responses` entry carrying one example body."""
    return {
        status: {
            "description": description or "Example",
            "content": {media_type: {"example": body}},
        }
    }


PLAN_ID = "0b9d6a4e-3f0c-4b8e-9a55-3a2f8d1c7e21"
RESULT_EXAMPLE: dict[str, Any] = {
    "feasible": True,
    "device": {"backend": "simulated", "name": "A100-80GB", "memory_bytes": 85899345920},
    "max_micro_batch_size": 1805,
    "micro_batch_size": 1024,
    "accumulation_steps": 1,
    "global_batch_size": 1024,
    "effective_global_batch_size": 1024,
    "learning_rate": 0.4,
    "lr_scaling": {
        "rule": "linear",
        "base_lr": 0.1,
        "base_batch_size": 256,
        "factor": 4.0,
        "warmup_steps": 6260,
    },
    "iterations_per_epoch": 1252,
    "optimizer_steps_per_epoch": 1252,
    "total_optimizer_steps": 112680,
    "memory": {
        "parameters": 102475264,
        "gradients": 8196096,
        "optimizer_state": 102232064,
        "input_batch": 616570880,
        "activations": 44850581504,
        "temporary": 411042304,
        "overhead": 536870912,
        "peak": 46627969024,
        "capacity": 85899345920,
    },
    "trials": [
        {
            "batch_size": 1,
            "fits": True,
            "peak_bytes": 877669888,
            "duration_s": 0.84,
            "reason": None,
            "phase": "search",
        }
    ],
    "warnings": [],
}
PLAN_EXAMPLE: dict[str, Any] = {
    "id": PLAN_ID,
    "status": "succeeded",
    "created_at": "2026-11-23T06:00:00Z",
    "started_at": "2026-11-23T06:00:01Z",
    "finished_at": "2026-11-23T06:00:08Z",
    "spec": RESNET50_A100,
    "spec_hash": "27e7f5a2" + "0" * 56,
    "attempts": 1,
    "worker_id": "gpu-node-1-4242",
    "cancel_requested": False,
    "error": None,
    "result": RESULT_EXAMPLE,
    "trials": [],
}
PAGE_EXAMPLE: dict[str, Any] = {
    "items": [
        {
            "id": PLAN_ID,
            "status": "succeeded",
            "created_at": "2026-11-23T06:00:00Z",
            "finished_at": "2026-11-23T06:00:08Z",
            "model": "resnet50",
            "spec_hash": "27e7f5a2" + "0" * 56,
            "max_micro_batch_size": 1805,
        }
    ],
    "next_cursor": "41",
}
EVENTS_EXAMPLE = (
    'id: 1.0\nevent: trial\ndata: {"batch_size": 1, "fits": true, "peak_bytes": 877669888, '
    '"duration_s": 0.84, "reason": null, "phase": "search", "index": 0, "attempt": 1}\n\n'
    'id: 1.end\nevent: end\ndata: {"status": "succeeded", "error": null, '
    '"max_micro_batch_size": 1805}\n\n'
)
WORKERS_EXAMPLE: dict[str, Any] = {
    "items": [
        {
            "id": "gpu-node-1-4242",
            "hostname": "gpu-node-1",
            "devices": {"kinds": ["simulated", "cpu", "cuda"]},
            "started_at": "2026-11-23T05:00:00Z",
            "heartbeat_at": "2026-11-23T06:00:05Z",
            "current_plan_id": None,
            "plans_done": 12,
            "stopped": False,
            "state": "idle",
        }
    ]
}
GPUS_EXAMPLE: dict[str, Any] = {
    "items": [
        {
            "name": "A100-80GB",
            "memory_bytes": 85100068864,
            "memory_gib": 79.26,
            "memory_source": "85100068864 B = 81920 MiB less 763 MiB reserved (nvidia-smi)",
            "tflops": {"fp32": 19.5, "tf32": 156, "fp16": 312, "bf16": 312},
            "measured_matmul_tflops": {"fp32": 19.2, "fp16": 259.0, "bf16": 265.0},
            "bandwidth_gbs": 2039,
            "architecture": "ampere",
            "compute_capability": "8.0",
            "supports_bf16": True,
            "supports_tf32": True,
        }
    ]
}
FIDELITY_EXAMPLE: dict[str, Any] = {
    "items": [
        {
            "model": "resnet50",
            "device_kind": "cuda",
            "device": "NVIDIA H100 80GB HBM3",
            "plans": 12,
            "over_predicted": 1,
            "mean_abs_relative_error": 0.012,
            "max_abs_relative_error": 0.031,
        }
    ]
}
METRICS_EXAMPLE = (
    '# TYPE trainplan_plans gauge\ntrainplan_plans{status="queued"} 3\ntrainplan_store_ooms 41\n'
)


# -- named models the tests and benches share ---------------------------------------------------
# A two-layer Llama small enough to trace in a second (no weights: a config).
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 256,
}


def mlp_model(*widths: int) -> dict[str, Any]:
    """A `layers` MLP: a Linear of each width, ReLU between them (the input width is inferred)."""
    layers: list[dict[str, Any]] = []
    for i, width in enumerate(widths):
        layers += [{"type": "ReLU"}] if i else []
        layers.append({"type": "Linear", "out_features": width})
    return {"source": "layers", "layers": layers}


# 512 -> 1024 -> 1024 -> 10 (the input width comes from the data).
MLP_MODEL: dict[str, Any] = mlp_model(1024, 1024, 10)
# The same shape, 4096 wide: the search bench's large-answer MLP.
WIDE_MLP_MODEL: dict[str, Any] = mlp_model(4096, 4096, 10)
# 16 -> 32 -> 4: plans in milliseconds (the recipe and planner tests).
TINY_MLP_MODEL: dict[str, Any] = mlp_model(32, 4)

# A small grayscale CNN (28x28, 10 classes) without the grayscale example's pooling head.
GRAY_CNN_MODEL: dict[str, Any] = {
    "source": "layers",
    "layers": [
        {"type": "Conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "BatchNorm2d"},
        {"type": "ReLU"},
        {"type": "MaxPool2d", "kernel_size": 2},
        {"type": "Conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1},
        {"type": "ReLU"},
        {"type": "Flatten"},
        {"type": "Linear", "out_features": 10},
    ],
}
