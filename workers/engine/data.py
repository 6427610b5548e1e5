"""Synthetic batches shaped like the spec's data: the content never matters, only shapes and dtypes.

Images are NCHW tensors; `channels_last` keeps the same logical shape with NHWC strides, which is
how PyTorch represents NHWC data and what the convolution kernels see.
"""

from __future__ import annotations

import math

import torch

from service.schemas.spec import DataSpec, ImageData, TensorData, TokensData


def sample_input(
    data: DataSpec,
    batch: int,
    device: str | torch.device,
    dtype: torch.dtype = torch.float32,
    vocab: int | None = None,
) -> torch.Tensor:
    """One input batch; token ids (below the model's vocabulary) for `tokens`, else floats."""
    if data.kind == "tokens":
        vocab = vocab or data.vocab_size or data.num_classes or 2
        return torch.randint(0, vocab, (batch, data.seq_len), device=device)
    if data.kind == "image":
        x = torch.randn(batch, data.channels, data.height, data.width, device=device, dtype=dtype)
        if data.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return x
    return torch.randn(batch, *data.shape, device=device, dtype=dtype)


def sample_target(
    data: DataSpec, batch: int, device: str | torch.device, classes: int | None = None
) -> torch.Tensor:
    """Labels for classification (one per sample, or one per token), values for regression."""
    if data.target == "regression":
        return torch.randn(batch, data.num_outputs, device=device)
    n = classes or data.num_classes or getattr(data, "vocab_size", None) or 2
    if data.kind == "tokens":
        return torch.randint(0, n, (batch, data.seq_len), device=device)
    return torch.randint(0, n, (batch,), device=device)


def sample_bytes(data: ImageData | TokensData | TensorData) -> int:
    """Bytes of one sample as the loader hands it over (fp32 values, int64 token ids)."""
    if data.kind == "tokens":
        return data.seq_len * 8
    if data.kind == "image":
        return data.channels * data.height * data.width * 4
    return math.prod(data.shape) * 4
