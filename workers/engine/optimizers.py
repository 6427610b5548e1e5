"""The optimizer a spec names, built the way users run it.

The implementation changes the memory a step needs: PyTorch's multi-tensor (foreach) kernels, its
CUDA default, allocate a temporary copy of the states for the whole parameter list; the fused
kernels allocate none; the per-parameter (for_loop) path one parameter's worth. bitsandbytes
keeps 8-bit states (one byte per element plus a float32 absmax per 256-element block, 32-bit for
parameters under 4,096 elements) and pages states of 100,000 elements or more to unified memory.
The tracer runs each of them for real on fake tensors, so these costs are measured, not assumed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from service.schemas.spec import BNB_OPTIMIZERS, TrainingSpec

# The spec's optimizers: class name (torch.optim's, or bitsandbytes.optim's for its names) and
# keyword arguments. The engine probes these and `configs` renders the same ones everywhere;
# bitsandbytes' AdamW classes take AdamW's weight decay like torch's.
TORCH_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {}),
    "sgd_momentum": ("SGD", {"momentum": 0.9}),
    "nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "adam": ("Adam", {}),
    "adamw": ("AdamW", {"weight_decay": 0.01}),
    "rmsprop": ("RMSprop", {}),
    "adagrad": ("Adagrad", {}),
    "adafactor": ("Adafactor", {}),
    "adamw_8bit": ("AdamW8bit", {"weight_decay": 0.01}),
    "paged_adamw": ("PagedAdamW", {"weight_decay": 0.01}),
    "paged_adamw_8bit": ("PagedAdamW8bit", {"weight_decay": 0.01}),
    "lion": ("Lion", {}),
    "lion_8bit": ("Lion8bit", {}),
    "paged_lion": ("PagedLion", {}),
    "paged_lion_8bit": ("PagedLion8bit", {}),
}
# bitsandbytes' `get_state_buffer`: only states of at least this many elements are paged.
PAGED_MIN_ELEMENTS = 100_000
# The Hugging Face Trainer's `optim` for the optimizers it has a name for.
_HF_NAMES = {
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw": "paged_adamw_32bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "lion": "lion_32bit",
    "lion_8bit": "lion_8bit",
    "paged_lion": "paged_lion_32bit",
    "paged_lion_8bit": "paged_lion_8bit",
}


@dataclass(frozen=True)
class OptimizerChoice:
    """One optimizer with its implementation, as code names it."""

    name: str  # the spec's optimizer
    impl: str  # foreach | fused | for_loop, or bitsandbytes' state: 32bit | 8bit | paged_...
    cls: str  # class name in `module`
    kwargs: dict[str, Any]  # hyper-parameters and the implementation's flags

    @property
    def bitsandbytes(self) -> bool:
        return self.name in BNB_OPTIMIZERS

    @property
    def paged(self) -> bool:
        return self.impl.startswith("paged")

    @property
    def module(self) -> str:
        return "bitsandbytes.optim" if self.bitsandbytes else "torch.optim"

    @property
    def path(self) -> str:
        return f"{self.module}.{self.cls}"

    @property
    def hf_optim(self) -> str | None:
        """The Trainer's `optim` naming this implementation (None: the Trainer has no name for
        it; the torch optimizers' own names mean PyTorch's default, foreach on CUDA)."""
        if self.bitsandbytes:
            return _HF_NAMES[self.name]
        if self.name in ("adam", "adamw"):
            return {"fused": "adamw_torch_fused", "foreach": "adamw_torch"}.get(self.impl)
        return None


def choose(training: TrainingSpec, gpu: bool = True) -> OptimizerChoice:
    """The spec's optimizer and implementation. `gpu=False` (a trace that stands for a real CPU
    run) keeps PyTorch's CPU default, the per-parameter loop, unless the spec names one."""
    cls, kwargs = TORCH_OPTIMIZERS[training.optimizer]
    if training.optimizer in BNB_OPTIMIZERS:
        return OptimizerChoice(training.optimizer, training.implementation, cls, kwargs)
    impl = training.implementation if gpu or training.optimizer_impl else "for_loop"
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for_loop": {"foreach": False}}
    return OptimizerChoice(training.optimizer, impl, cls, {**kwargs, **flags[impl]})


def make_optimizer(
    choice: OptimizerChoice,
    params: Sequence[torch.Tensor],
    lr: float,
    partitioned: bool = False,
) -> torch.optim.Optimizer:
    """`partitioned`: ZeRO-1, each rank keeps the state of its partition of the parameters
    (`ZeroRedundancyOptimizer`)."""
    cls = _optimizer_class(choice)
    if partitioned:
        # torch.distributed.optim (0.5 s to import, with RPC): only ZeRO-1 plans use it
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=lr, **choice.kwargs)
    with _traceable_bitsandbytes() if choice.bitsandbytes else nullcontext():
        optimizer: torch.optim.Optimizer = cls(params, lr=lr, **choice.kwargs)
    return optimizer


def _optimizer_class(choice: OptimizerChoice) -> Any:
    if choice.bitsandbytes:
        import bitsandbytes as bnb  # the optional `peft` extra

        return getattr(bnb.optim, choice.cls)
    return getattr(torch.optim, choice.cls)


def paged_states(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The state tensors bitsandbytes puts in unified (host-backed) memory."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if key.startswith("state") and value.numel() >= PAGED_MIN_ELEMENTS:
                yield value


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def prepare_bitsandbytes() -> None:
    """Import bitsandbytes (about 4 s) and build its 8-bit maps once, ahead of any plan."""
    _quantization_maps()


@cache
def _quantization_maps() -> dict[bool, list[float]]:
    from bitsandbytes import functional  # the optional `peft` extra

    with unset_fake_temporarily():
        return {s: functional.create_dynamic_map(signed=s).tolist() for s in (True, False)}


@contextmanager
def _traceable_bitsandbytes() -> Iterator[None]:
    """bitsandbytes builds its 8-bit quantization maps with `.tolist()`, which a fake tensor
    cannot answer: hand it the same maps computed once on real tensors."""
    from bitsandbytes import functional  # the optional `peft` extra

    maps = _quantization_maps()
    original = functional.create_dynamic_map

    def cached(signed: bool = True, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            return original(signed, *args, **kwargs)
        return torch.tensor(maps[bool(signed)])

    functional.create_dynamic_map = cached
    try:
        yield
    finally:
        functional.create_dynamic_map = original
