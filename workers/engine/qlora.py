"""QLoRA's base model: linear weights stored in 4-bit NF4 by bitsandbytes, dequantized per op.

The layers are bitsandbytes' own ops (`quantize_4bit`, `matmul_4bit`), which register fake
kernels, so the trace holds what a real run holds: the packed weights (half a byte per element),
the block-wise absmax statistics (double-quantized, as `bnb_4bit_use_double_quant=True`), and,
inside each matmul, the bf16 weight it dequantizes for the length of the op. bitsandbytes'
`Params4bit` cannot wrap a fake tensor, so `NF4Linear` keeps the packed weight in a plain frozen
Parameter and calls `matmul_4bit` as `Linear4bit.forward` does. The output layer stays unquantized
(transformers' `BitsAndBytesConfig` skips it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from service.schemas.spec import PeftSpec

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit


class NF4Linear(nn.Linear):
    """A Linear whose weight becomes NF4 once materialised (`quantize`)."""

    compute_dtype = torch.bfloat16
    quant_state: Any = None

    def quantize(self) -> None:
        import bitsandbytes.functional as bnbf  # the optional `peft` extra

        packed, state = bnbf.quantize_4bit(
            self.weight.data.to(self.compute_dtype),
            blocksize=BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
        )
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_state is None:
            return super().forward(x)
        import bitsandbytes as bnb  # the optional `peft` extra

        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = bnb.matmul_4bit(
            x.to(self.compute_dtype), self.weight.t(), bias=bias, quant_state=self.quant_state
        )
        return out.to(x.dtype)


def quantize_base(model: nn.Module, spec: PeftSpec) -> int:
    """Swap every nn.Linear but the output layer for an NF4Linear (on the meta model); returns
    how many were swapped."""
    del spec  # every linear layer is quantized, adapters or not, as QLoRA does
    output = getattr(model, "get_output_embeddings", lambda: None)()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not output:
                swapped = NF4Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                setattr(parent, name, swapped)
                count += 1
    return count


def quantize_materialised(model: nn.Module) -> None:
    """Quantize every NF4Linear of a materialised model. bitsandbytes keeps the double
    quantization's code table (256 floats) in a process-wide cache, made by the first
    quantization: each job makes its own under its tracker, as a fresh process on the GPU
    does, so a plan does not depend on the plans the worker ran before (a QLoRA peak differed
    by bytes between the first plan in a process and the next), and no fake tensor outlives
    its trace."""
    import bitsandbytes.functional as bnbf  # the optional `peft` extra

    bnbf.name2qmap.pop("dynamic", None)
    try:
        for module in model.modules():
            if isinstance(module, NF4Linear):
                module.quantize()
    finally:
        bnbf.name2qmap.pop("dynamic", None)
