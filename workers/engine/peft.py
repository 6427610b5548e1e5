"""Parameter-efficient fine-tuning: LoRA adapters from Hugging Face `peft` on the meta model.

`get_peft_model` freezes the base and adds A (r x in) and B (out x r) to each target module;
applied before materialising, the adapters are traced like any parameter: their gradients and
optimizer state are the only ones the step makes. QLoRA (`quantize`) also replaces the base's
linear weights by bitsandbytes' 4-bit NF4 storage (`qlora`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from service.schemas.spec import PeftSpec
from workers.engine.distributed import local
from workers.engine.errors import SpecError
from workers.engine.qlora import quantize_base

if TYPE_CHECKING:
    from peft import LoraConfig

FIELD = ("training", "peft", "target_modules")


def lora_config(spec: PeftSpec, family: str) -> LoraConfig:
    from peft import LoraConfig  # the optional `peft` extra; 1 s to import, with bitsandbytes

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM" if family == "lm" else None,
    )


def apply_peft(model: nn.Module, spec: PeftSpec, family: str) -> nn.Module:
    """The model with LoRA adapters on the target modules; a target that matches nothing is the
    spec's error, named at its field."""
    from peft import get_peft_model  # the optional `peft` extra

    if spec.method == "qlora":
        quantize_base(model, spec)
    try:
        wrapped: nn.Module = get_peft_model(model, lora_config(spec, family))
    except ValueError as exc:
        raise SpecError(FIELD, str(exc)) from exc
    return wrapped


def adapter_parameters(model: nn.Module) -> Iterator[torch.Tensor]:
    """The LoRA A and B weights (peft names them `lora_A` / `lora_B`)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            yield local(param)
