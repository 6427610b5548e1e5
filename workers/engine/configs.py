"""Launch settings that carry a plan into the frameworks people train with.

One source of truth, `PlanNumbers`, feeds all the renderings (a plain PyTorch loop, Lightning, the
Hugging Face Trainer, DeepSpeed, Accelerate), so they cannot disagree with each other or with the
plan: micro-batch x accumulation x world_size = the effective global batch, the scaled learning
rate and its schedule (`configs.recipe`, the very functions the plan's rates come from), the
optimizer and its implementation, per-group rates, early stopping. Each rendering is checked
against the library's own code in `tests/engine/test_configs.py` and `tests/engine/test_recipe.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from service.schemas.spec import PlanSpec
from workers.engine.optimizers import OptimizerChoice, choose
from workers.engine.recipe import param_groups
from workers.engine.recipe_source import recipe_source
from workers.engine.schedule import Schedule

LIGHTNING_PRECISION = {
    "fp32": "32-true",
    "tf32": "32-true",  # plus torch.set_float32_matmul_precision("high")
    "fp16-mixed": "16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-true",
}


@dataclass(frozen=True)
class PlanNumbers:
    """The figures of a feasible plan that every framework needs."""

    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    learning_rate: float
    warmup_steps: int
    total_optimizer_steps: int
    schedule: Schedule | None = None  # None: warm-up, then constant
    # the optimizer's hyper-parameters for the scaled batch (Malladi et al.'s betas and eps)
    optimizer_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.world_size

    @property
    def lr_schedule(self) -> Schedule:
        if self.schedule is not None:
            return self.schedule
        return Schedule("constant", self.warmup_steps, max(1, self.total_optimizer_steps))


def optimizer_kwargs(spec: PlanSpec, numbers: PlanNumbers) -> dict[str, Any]:
    """The optimizer's keyword arguments as the plan runs it: its implementation's flags and
    hyper-parameters, with the scaled batch's betas and eps."""
    return {**choose(spec.training).kwargs, **numbers.optimizer_overrides}


# The mixed precisions' lower dtype, as rendered code names it (autocast, FSDP's param_dtype).
AUTOCAST_DTYPE = {"bf16-mixed": "bfloat16", "fp16-mixed": "float16"}
ZERO_STAGE = {"zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3, "hybrid_shard": 3}
# FSDP's sharding strategies by the names Lightning, the HF Trainer and Accelerate take.
FSDP_SHARDING = {
    "fsdp": "FULL_SHARD",
    "zero3": "FULL_SHARD",
    "zero2": "SHARD_GRAD_OP",
    "hybrid_shard": "HYBRID_SHARD",
}


def build_configs(spec: PlanSpec, numbers: PlanNumbers) -> dict[str, Any]:
    out: dict[str, Any] = {
        "recipe": recipe_source(numbers.lr_schedule, numbers.learning_rate, param_groups(spec)),
        "pytorch": pytorch_loop(spec, numbers),
        "lightning": lightning_settings(spec, numbers),
        "hf_trainer": hf_trainer_arguments(spec, numbers),
        "deepspeed": deepspeed_config(spec, numbers),
        "accelerate": accelerate_config(spec, numbers),
    }
    if spec.training.peft is not None:
        out["peft"] = peft_settings(spec)
    if spec.training.early_stopping is not None:
        out["hf_callbacks"] = hf_callbacks(spec)
    return out


def _sharding(spec: PlanSpec) -> str:
    """FSDP's sharding strategy; with reshard_after_forward false, fsdp is SHARD_GRAD_OP."""
    strategy = spec.training.strategy
    if strategy == "fsdp" and not spec.training.parallelism.reshard_after_forward:
        return "SHARD_GRAD_OP"
    return FSDP_SHARDING[strategy]


def _nodes(spec: PlanSpec, numbers: PlanNumbers) -> tuple[int, int]:
    """(nodes, GPUs per node) of the plan's world."""
    per_node = min(spec.training.parallelism.gpus_per_node, numbers.world_size)
    return math.ceil(numbers.world_size / per_node), per_node


def peft_settings(spec: PlanSpec) -> dict[str, Any]:
    """`peft.LoraConfig(**lora_config)`; for QLoRA also
    `transformers.BitsAndBytesConfig(**bnb_config)` to load the base model with."""
    peft = spec.training.peft
    assert peft is not None
    lora = {
        "r": peft.r,
        "lora_alpha": peft.alpha,
        "lora_dropout": peft.dropout,
        "target_modules": peft.target_modules,
        "task_type": "CAUSAL_LM" if spec.model.source == "transformers" else None,
    }
    out: dict[str, Any] = {"lora_config": lora}
    if peft.method == "qlora":
        out["bnb_config"] = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
        }
    return out


def accelerate_config(spec: PlanSpec, numbers: PlanNumbers) -> dict[str, Any]:
    """The YAML of `accelerate config` (write it out and `accelerate launch --config_file`);
    accumulation goes to `Accelerator(gradient_accumulation_steps=...)` (the HF Trainer's
    arguments carry it)."""
    strategy = spec.training.strategy
    nodes, _ = _nodes(spec, numbers)
    precision = spec.training.precision
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": nodes,
        "num_processes": numbers.world_size,
        "mixed_precision": {"fp16-mixed": "fp16", "bf16-mixed": "bf16"}.get(precision, "no"),
        "machine_rank": 0,
        "use_cpu": False,
        "debug": False,
        "main_training_function": "main",
    }
    if strategy == "none" or numbers.world_size == 1:
        return out | {"distributed_type": "NO"}
    if strategy == "ddp":
        return out | {"distributed_type": "MULTI_GPU"}
    if strategy == "zero1":
        return out | {
            "distributed_type": "DEEPSPEED",
            "deepspeed_config": {
                "zero_stage": 1,
                "gradient_accumulation_steps": numbers.accumulation_steps,
            },
        }
    parallelism = spec.training.parallelism
    return out | {
        "distributed_type": "FSDP",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_sharding_strategy": _sharding(spec),
            "fsdp_reshard_after_forward": spec.training.reshards_after_forward,
            "fsdp_offload_params": parallelism.cpu_offload,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_activation_checkpointing": spec.training.gradient_checkpointing,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        },
    }


def lightning_settings(spec: PlanSpec, numbers: PlanNumbers) -> dict[str, Any]:
    """`trainer` is `lightning.pytorch.Trainer(**trainer)` (with `callbacks` built from their
    class paths); the rest goes to your DataLoader and `configure_optimizers`, which builds the
    optimizer over `configs.recipe`'s `param_groups(self)` and returns
    `{"scheduler": make_scheduler(optimizer), **lr_scheduler}` (plus `make_plateau`'s, per epoch,
    with `monitor`). Lightning steps at the end of an epoch even with a partial accumulation
    window, as the plan's `optimizer_steps_per_epoch` assumes."""
    choice = choose(spec.training)
    tf32 = spec.training.precision == "tf32"
    nodes, per_node = _nodes(spec, numbers)
    schedule = numbers.lr_schedule
    out: dict[str, Any] = {
        **({"float32_matmul_precision": "high"} if tf32 else {}),
        "trainer": {
            "accumulate_grad_batches": numbers.accumulation_steps,
            "precision": LIGHTNING_PRECISION[spec.training.precision],
            "devices": per_node,
            "num_nodes": nodes,
            "strategy": _lightning_strategy(spec),
            "max_epochs": math.ceil(spec.training.epochs),
            "max_steps": numbers.total_optimizer_steps,
        },
        "batch_size": numbers.micro_batch_size,
        "learning_rate": numbers.learning_rate,
        "warmup_steps": numbers.warmup_steps,
        "optimizer": choice.path,
        "optimizer_kwargs": optimizer_kwargs(spec, numbers),
        "lr_scheduler": {"interval": "step", "frequency": 1},
        "gradient_checkpointing": spec.training.gradient_checkpointing,
    }
    if schedule.name == "plateau":
        out["plateau"] = {"monitor": schedule.params["monitor"], "interval": "epoch"}
    stopping = spec.training.early_stopping
    if stopping is not None:
        out["callbacks"] = [
            {
                "class_path": "lightning.pytorch.callbacks.EarlyStopping",
                "init_args": stopping.model_dump(),
            }
        ]
    return out


def _lightning_strategy(spec: PlanSpec) -> Any:
    """A strategy name Lightning's registry knows, or FSDPStrategy's arguments."""
    strategy = spec.training.strategy
    if strategy in ("none", "ddp"):
        return "ddp" if strategy == "ddp" else "auto"
    if strategy == "zero1":
        return "deepspeed_stage_1"
    return {
        "class": "lightning.pytorch.strategies.FSDPStrategy",
        "sharding_strategy": _sharding(spec),
        "cpu_offload": spec.training.parallelism.cpu_offload,
        "auto_wrap_policy": "transformer blocks (model._no_split_modules)",
    }


def hf_trainer_arguments(spec: PlanSpec, numbers: PlanNumbers) -> dict[str, Any]:
    """Keyword arguments of `transformers.TrainingArguments` (add `output_dir`). HF's `adamw_torch`
    with weight_decay 0 is Adam; its `adafactor` is transformers' own Adafactor."""
    training = spec.training
    optim, optim_args, weight_decay = _hf_optimizer(choose(training), numbers.optimizer_overrides)
    out: dict[str, Any] = {
        "per_device_train_batch_size": numbers.micro_batch_size,
        "gradient_accumulation_steps": numbers.accumulation_steps,
        "learning_rate": numbers.learning_rate,
        **_hf_schedule(spec, numbers),
        **_hf_betas(numbers.optimizer_overrides),
        **_hf_evaluation(spec, numbers),
        "num_train_epochs": training.epochs,
        "max_steps": numbers.total_optimizer_steps,
        "optim": optim,
        "weight_decay": weight_decay,
        "bf16": training.precision in ("bf16-mixed", "bf16"),
        "fp16": training.precision == "fp16-mixed",
        "gradient_checkpointing": training.gradient_checkpointing,
    }
    if training.precision == "tf32":
        out["tf32"] = True
    if optim_args:
        out["optim_args"] = optim_args
    strategy = training.strategy
    if strategy == "zero1":
        out["deepspeed"] = deepspeed_config(spec, numbers)
    elif strategy in FSDP_SHARDING:
        options = [_sharding(spec).lower(), "auto_wrap"]
        if training.parallelism.cpu_offload:
            options.append("offload")
        out["fsdp"] = " ".join(options)
        out["fsdp_config"] = {"version": 2}
    return out


def hf_native_schedule(schedule: Schedule) -> tuple[str, dict[str, Any]] | None:
    """The Trainer's own scheduler equal to the plan's; None where `configs.recipe`'s goes in.
    Per-group rates do not change it: the Trainer builds its scheduler on the optimizer it is
    given (`Trainer(optimizers=(grouped_optimizer, None))`), keeping each group's ratio."""
    return schedule.hf_native


def deepspeed_takes_recipe(spec: PlanSpec, schedule: Schedule, peak: float) -> bool:
    """Whether DeepSpeed gets the recipe's scheduler (and per-group optimizer) through
    `deepspeed.initialize`: no block of its own equals the schedule (a constant rate needs
    none), or per-group rates, which its optimizer block cannot hold."""
    plain = schedule.name == "constant" and not schedule.warmup
    no_block = schedule.deepspeed_native(peak) is None and not plain
    return no_block or bool(spec.training.param_groups)


def _hf_schedule(spec: PlanSpec, numbers: PlanNumbers) -> dict[str, Any]:
    """The Trainer's own scheduler where it equals the plan's; else a constant rate, to be
    replaced by `Trainer(optimizers=(optimizer, make_scheduler(optimizer)))` from
    `configs.recipe` (a plan warning says so)."""
    schedule = numbers.lr_schedule
    native = hf_native_schedule(schedule)
    if native is None:
        return {"warmup_steps": 0, "lr_scheduler_type": "constant"}
    name, kwargs = native
    out: dict[str, Any] = {"warmup_steps": schedule.warmup, "lr_scheduler_type": name}
    if kwargs:
        out["lr_scheduler_kwargs"] = kwargs
    return out


def _hf_betas(overrides: dict[str, Any]) -> dict[str, Any]:
    if "betas" not in overrides:
        return {}
    beta1, beta2 = overrides["betas"]
    return {"adam_beta1": beta1, "adam_beta2": beta2, "adam_epsilon": overrides["eps"]}


def _hf_evaluation(spec: PlanSpec, numbers: PlanNumbers) -> dict[str, Any]:
    """An epoch-end evaluation for early stopping (`configs.hf_callbacks`) and for a plateau
    schedule, which both read `metric_for_best_model`."""
    stopping = spec.training.early_stopping
    schedule = numbers.lr_schedule
    if stopping is None and schedule.name != "plateau":
        return {}
    monitor = stopping.monitor if stopping else schedule.params["monitor"]
    mode = stopping.mode if stopping else schedule.params["mode"]
    out: dict[str, Any] = {
        "eval_strategy": "epoch",
        "metric_for_best_model": monitor,
        "greater_is_better": mode == "max",
    }
    if stopping is not None:  # EarlyStoppingCallback needs the best model kept
        out |= {"save_strategy": "epoch", "load_best_model_at_end": True}
    return out


def hf_callbacks(spec: PlanSpec) -> list[dict[str, Any]]:
    """`Trainer(callbacks=[EarlyStoppingCallback(**kwargs)])`."""
    stopping = spec.training.early_stopping
    assert stopping is not None
    return [
        {
            "class": "transformers.EarlyStoppingCallback",
            "kwargs": {
                "early_stopping_patience": stopping.patience,
                "early_stopping_threshold": stopping.min_delta,
            },
        }
    ]


def _hf_optimizer(
    choice: OptimizerChoice, overrides: dict[str, Any]
) -> tuple[str, str | None, float]:
    """The Trainer's `optim`, `optim_args` and weight decay for the plan's optimizer. Its torch
    names other than `adamw_torch_fused` leave the implementation to PyTorch (foreach on CUDA):
    a for_loop plan has no Trainer name of its own."""
    name = choice.name
    weight_decay = float(choice.kwargs.get("weight_decay", 0.0))
    if choice.hf_optim is not None:
        return choice.hf_optim, None, weight_decay
    if name in ("sgd", "sgd_momentum", "nesterov"):
        args = {
            "sgd": None,
            "sgd_momentum": "momentum=0.9",
            "nesterov": "momentum=0.9,nesterov=True",
        }
        return "sgd", args[name], 0.0
    if name in ("adam", "adamw"):  # for_loop: the Trainer's name leaves the kernel to PyTorch
        return "adamw_torch", None, weight_decay
    if name == "rmsprop" and overrides:  # the Trainer reads RMSprop's alpha and eps from here
        return name, f"alpha={overrides['alpha']!r},eps={overrides['eps']!r}", 0.0
    return name, None, 0.0  # rmsprop, adagrad, adafactor have HF names of their own


def deepspeed_config(spec: PlanSpec, numbers: PlanNumbers) -> dict[str, Any]:
    """A DeepSpeed JSON: DeepSpeed asserts train_batch_size = micro x accumulation x world size.
    Optimizer names outside DeepSpeed's own set resolve to the torch.optim class of that name."""
    training = spec.training
    return {
        "train_batch_size": numbers.global_batch_size,
        "train_micro_batch_size_per_gpu": numbers.micro_batch_size,
        "gradient_accumulation_steps": numbers.accumulation_steps,
        **_deepspeed_optimizer(spec, numbers),
        **_deepspeed_scheduler(spec, numbers),
        "bf16": {"enabled": training.precision in ("bf16-mixed", "bf16")},
        "fp16": {"enabled": training.precision == "fp16-mixed"},
        "zero_optimization": _zero(spec),
    }


def _deepspeed_optimizer(spec: PlanSpec, numbers: PlanNumbers) -> dict[str, Any]:
    """DeepSpeed's own optimizer block (its fused Adam for Adam and AdamW: the implementation
    flags are PyTorch's and stay out); none for bitsandbytes or per-group rates: that optimizer
    is passed to `deepspeed.initialize(optimizer=...)` as the PyTorch loop builds it."""
    choice = choose(spec.training)
    if choice.bitsandbytes or spec.training.param_groups:
        return {}
    params = {"lr": numbers.learning_rate}
    kwargs = optimizer_kwargs(spec, numbers)
    params |= {k: v for k, v in kwargs.items() if k not in ("foreach", "fused")}
    if choice.cls == "Adam":
        params["adam_w_mode"] = False  # DeepSpeed's "Adam" is AdamW unless told otherwise
    return {"optimizer": {"type": choice.cls, "params": params}}


def _deepspeed_scheduler(spec: PlanSpec, numbers: PlanNumbers) -> dict[str, Any]:
    """A scheduler block where DeepSpeed's equals the plan's (see `Schedule.deepspeed_native`);
    none for a constant rate, or where `make_scheduler` goes to `deepspeed.initialize`."""
    native = numbers.lr_schedule.deepspeed_native(numbers.learning_rate)
    return {} if native is None else {"scheduler": native}


def _zero(spec: PlanSpec) -> dict[str, Any]:
    """ZeRO's stage for the strategy (fsdp's equivalent is stage 3), with CPU offload."""
    stage = ZERO_STAGE.get(spec.training.strategy, 0)
    out: dict[str, Any] = {"stage": stage}
    if stage and spec.training.parallelism.cpu_offload:
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        out["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3 and spec.training.parallelism.strategy == "hybrid_shard":
        out["zero_hpz_partition_size"] = spec.training.parallelism.gpus_per_node
    return out


def pytorch_loop(spec: PlanSpec, numbers: PlanNumbers) -> str:
    """A complete training loop with accumulation (loss / k, step every k, and at an epoch's end).
    It expects `model`, `train_dataset` and, for non-Hugging Face models, `loss_fn`; with early
    stopping or a plateau schedule also `evaluate(model)`, returning the monitored metric."""
    training = spec.training
    hf = spec.model.source == "transformers"
    ddp = numbers.world_size > 1
    choice = choose(training)
    evaluates = _evaluates(spec, numbers)
    lines = [
        f"# trainplan: micro-batch {numbers.micro_batch_size} x {numbers.accumulation_steps} "
        f"accumulation x {numbers.world_size} rank(s) = global batch {numbers.global_batch_size}",
        "# Expects "
        + _expected_names(hf, evaluates)
        + (
            f"; launch with: torchrun --nproc_per_node={numbers.world_size} train.py"
            if ddp
            else " to be defined."
        ),
        *(["import contextlib", ""] if ddp else []),
        *(["import bitsandbytes"] if choice.bitsandbytes else []),
        "import torch",
        "from torch.utils.data import DataLoader",
        "",
        f"MICRO_BATCH = {numbers.micro_batch_size}",
        f"ACCUMULATION = {numbers.accumulation_steps}",
        f"TOTAL_STEPS = {numbers.total_optimizer_steps}",
        "",
        recipe_source(numbers.lr_schedule, numbers.learning_rate, param_groups(spec)),
    ]
    lines += _device_setup(ddp)
    if training.precision == "tf32":
        lines += ["torch.backends.cuda.matmul.allow_tf32 = True  # convolutions already are", ""]
    lines += _model_setup(spec, hf, ddp)
    lines += [
        *_optimizer_lines(training.strategy, choice, optimizer_kwargs(spec, numbers)),
        "scheduler = make_scheduler(optimizer)  # stepped after each optimizer step",
        *(["plateau = make_plateau(optimizer)  # stepped each epoch"] if _plateau(numbers) else []),
    ]
    if training.precision == "fp16-mixed":
        lines.append("scaler = torch.amp.GradScaler(DEVICE)")
    lines += _data_setup(ddp)
    lines += _loop_body(spec, hf, ddp)
    if evaluates:
        lines += _epoch_end(spec, numbers)
    if ddp:  # every rank done before the group goes (gloo aborts on a peer that left early)
        lines += ["", "torch.distributed.barrier()", "torch.distributed.destroy_process_group()"]
    return "\n".join(lines) + "\n"


def _expected_names(hf: bool, evaluates: bool) -> str:
    names = ["`model`", "`train_dataset`"]
    names += [] if hf else ["`loss_fn`"]
    names += ["`evaluate(model)` (the monitored metric)"] if evaluates else []
    return ", ".join(names[:-1]) + " and " + names[-1]


def _plateau(numbers: PlanNumbers) -> bool:
    return numbers.lr_schedule.name == "plateau"


def _evaluates(spec: PlanSpec, numbers: PlanNumbers) -> bool:
    return spec.training.early_stopping is not None or _plateau(numbers)


def _epoch_end(spec: PlanSpec, numbers: PlanNumbers) -> list[str]:
    """At each epoch's end: the metric, the plateau's cut, early stopping's count."""
    lines = ["    metric = float(evaluate(model))"]
    if _plateau(numbers):
        lines.append("    plateau.step(metric)")
    stopping = spec.training.early_stopping
    if stopping is not None:
        better = (
            f"metric < best - {stopping.min_delta!r}"
            if stopping.mode == "min"
            else f"metric > best + {stopping.min_delta!r}"
        )
        lines += [
            f"    # early stopping on {stopping.monitor!r}: {stopping.patience} epochs without "
            "improvement",
            f"    if best is None or {better}:",
            "        best, stale = metric, 0",
            "    else:",
            "        stale += 1",
            f"    if stale >= {stopping.patience}:",
            "        break",
        ]
    return lines


def _optimizer_lines(strategy: str, choice: OptimizerChoice, kwargs: dict[str, Any]) -> list[str]:
    params = "param_groups(model)"
    opt_args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    if strategy == "zero1":  # each rank keeps the optimizer state of its partition
        return [
            "from torch.distributed.optim import ZeroRedundancyOptimizer",
            "",
            f"optimizer = ZeroRedundancyOptimizer({params}, "
            f"optimizer_class={choice.path}, lr=LR{opt_args})",
        ]
    return [f"optimizer = {choice.path}({params}, lr=LR{opt_args})"]


def _device_setup(ddp: bool) -> list[str]:
    if not ddp:
        return ['DEVICE = "cuda" if torch.cuda.is_available() else "cpu"', ""]
    return [
        "import os",
        "",
        "from torch.nn.parallel import DistributedDataParallel",
        "from torch.utils.data.distributed import DistributedSampler",
        "",
        "# NCCL on GPUs; gloo runs the same loop on CPUs (torchrun --nproc_per_node=2)",
        'BACKEND = "nccl" if torch.cuda.is_available() else "gloo"',
        "torch.distributed.init_process_group(BACKEND)",
        'LOCAL_RANK = int(os.environ["LOCAL_RANK"])',
        'DEVICE = f"cuda:{LOCAL_RANK}" if BACKEND == "nccl" else "cpu"',
        'if BACKEND == "nccl":',
        "    torch.cuda.set_device(LOCAL_RANK)",
        "",
    ]


def _model_setup(spec: PlanSpec, hf: bool, ddp: bool) -> list[str]:
    training = spec.training
    lines = ["model = model.to(DEVICE)"]
    if training.precision == "bf16":
        lines.append("model = model.to(torch.bfloat16)  # pure bf16: weights, grads and state")
    if getattr(spec.data, "layout", None) == "channels_last":
        lines.append("model = model.to(memory_format=torch.channels_last)")
    if training.gradient_checkpointing:
        if hf:
            lines.append("model.gradient_checkpointing_enable()")
        else:
            lines.append(
                "# gradient checkpointing: wrap blocks in torch.utils.checkpoint.checkpoint"
                "(block, x, use_reentrant=False), as trainplan probed"
            )
    lines += _peft_setup(spec)
    strategy = training.strategy
    if strategy in FSDP_SHARDING:
        lines += _fully_shard(spec)
    elif ddp:
        lines.append(
            "model = DistributedDataParallel("
            'model, device_ids=[LOCAL_RANK] if BACKEND == "nccl" else None)'
        )
    lines.append("")
    return lines


def _peft_setup(spec: PlanSpec) -> list[str]:
    peft = spec.training.peft
    if peft is None:
        return []
    settings = peft_settings(spec)
    lines = [
        "from peft import LoraConfig, get_peft_model",
        "",
        f"model = get_peft_model(model, LoraConfig(**{settings['lora_config']!r}))",
    ]
    if peft.method == "qlora":
        lines.insert(
            0,
            "# QLoRA: load `model` with quantization_config="
            f"transformers.BitsAndBytesConfig(**{settings['bnb_config']!r})",
        )
    return lines


def _fully_shard(spec: PlanSpec) -> list[str]:
    """FSDP2: shard each block, then the root; sharding strategies are fully_shard's arguments."""
    parallelism = spec.training.parallelism
    strategy = spec.training.strategy
    reshard = spec.training.reshards_after_forward
    lines = [
        "from torch.distributed.device_mesh import init_device_mesh",
        "from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard",
        "",
        "WORLD = torch.distributed.get_world_size()",
    ]
    if strategy == "hybrid_shard":
        per_node = min(parallelism.gpus_per_node, spec.training.world_size)
        lines += [
            f"PER_NODE = min({per_node}, WORLD)",
            "mesh = init_device_mesh(DEVICE.split(':')[0], (WORLD // PER_NODE, PER_NODE), "
            'mesh_dim_names=("replicate", "shard"))',
        ]
    else:
        lines.append("mesh = init_device_mesh(DEVICE.split(':')[0], (WORLD,))")
    low = AUTOCAST_DTYPE.get(spec.training.precision)
    policy = (
        f"MixedPrecisionPolicy(param_dtype=torch.{low}, reduce_dtype=torch.float32)"
        if low
        else "MixedPrecisionPolicy()"
    )
    offload = ", offload_policy=CPUOffloadPolicy()" if parallelism.cpu_offload else ""
    lines += [
        f"SHARD = dict(mesh=mesh, reshard_after_forward={reshard}, mp_policy={policy}{offload})",
        "blocks = set(getattr(model, '_no_split_modules', None) or ())",
        "for module in list(model.modules()):",
        "    if type(module).__name__ in blocks or (",
        "        not blocks",
        "        and isinstance(module, torch.nn.Linear)",
        "    ):",
        "        fully_shard(module, **SHARD)",
        "fully_shard(model, **SHARD)",
    ]
    return lines


def _data_setup(ddp: bool) -> list[str]:
    if ddp:
        return [
            "sampler = DistributedSampler(train_dataset, shuffle=True)",
            "loader = DataLoader(train_dataset, batch_size=MICRO_BATCH, sampler=sampler, "
            "pin_memory=True)",
            "",
        ]
    return [
        "loader = DataLoader(train_dataset, batch_size=MICRO_BATCH, shuffle=True)",
        "",
    ]


def _autocast(precision: str) -> str | None:
    dtype = AUTOCAST_DTYPE.get(precision)
    return f"torch.autocast(DEVICE, dtype=torch.{dtype})" if dtype else None


def _loop_body(spec: PlanSpec, hf: bool, ddp: bool) -> list[str]:
    fp16 = spec.training.precision == "fp16-mixed"
    forward = (
        "loss = model(**batch).loss / ACCUMULATION"
        if hf
        else "loss = loss_fn(model(inputs), targets) / ACCUMULATION"
    )
    to_device = (
        "batch = {k: v.to(DEVICE, non_blocking=True) for k, v in batch.items()}"
        if hf
        else "inputs, targets = inputs.to(DEVICE, non_blocking=True), "
        "targets.to(DEVICE, non_blocking=True)"
    )
    unpack = "batch" if hf else "(inputs, targets)"
    cast = []
    if spec.training.precision == "bf16" and not hf:  # bf16 weights need bf16 float inputs
        cast = ["if inputs.is_floating_point():", "    inputs = inputs.to(torch.bfloat16)"]
    backward = "scaler.scale(loss).backward()" if fp16 else "loss.backward()"
    autocast = _autocast(spec.training.precision)
    micro_step = [f"with {autocast}:", f"    {forward}"] if autocast else [forward]
    micro_step.append(backward)
    if spec.training.strategy in FSDP_SHARDING:  # reduce-scatter on the stepping micro-batch
        micro_step = ["model.set_requires_gradient_sync(stepping)", *micro_step]
    elif ddp:  # gradients are all-reduced only on the micro-batch that steps
        micro_step = [
            "with model.no_sync() if not stepping else contextlib.nullcontext():",
            *("    " + line for line in micro_step),
        ]
    lines = [
        "step = 0",
        "epoch = 0",
        *(["best, stale = None, 0"] if spec.training.early_stopping else []),
        "model.train()",
        "while step < TOTAL_STEPS:",
    ]
    if ddp:
        lines.append("    sampler.set_epoch(epoch)")
    lines += [
        f"    for i, {unpack} in enumerate(loader):",
        f"        {to_device}",
        *("        " + line for line in cast),
        "        # step every ACCUMULATION micro-batches, and on the last (partial) window",
        "        stepping = (i + 1) % ACCUMULATION == 0 or i + 1 == len(loader)",
        *("        " + line for line in micro_step),
        "        if stepping:",
    ]
    if fp16:
        lines += ["            scaler.step(optimizer)", "            scaler.update()"]
    else:
        lines.append("            optimizer.step()")
    lines += [
        "            scheduler.step()",
        "            optimizer.zero_grad(set_to_none=True)",
        "            step += 1",
        "            if step == TOTAL_STEPS:",
        "                break",
        "    epoch += 1",
    ]
    return lines
