"""Request examples shown in the OpenAPI documentation (and used by the tests)."""

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
    "search": {"max_batch_size": 65536, "headroom": 0.05, "micro_batch": "power_of_two"},
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

PLAN_EXAMPLES: dict[str, Any] = {
    "resnet50": {"summary": "ResNet-50 on ImageNet, A100-80GB, bf16-mixed", "value": RESNET50_A100},
    "grayscale_cnn": {
        "summary": "A small grayscale CNN from layers, T4",
        "value": SMALL_GRAYSCALE_CNN,
    },
}
