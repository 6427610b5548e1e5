"""Context parallelism: each sample's sequence split over N ranks, attention run as a ring.

`parallelism.context_parallel: N` traces what torchtitan runs: a (dp_shard, cp) device mesh,
FSDP over both dimensions flattened (every rank holds 1/world of the parameters), and
`torch.distributed.tensor.experimental.context_parallel` on the cp dimension. Each rank holds
seq_len / N tokens of every sample (the head-tail load balancer gives rank 0 the first and the
last chunk of 2N); in every attention call CP turns q/k/v into DTensors sharded on the sequence
and its ring handler (`_context_parallel/_attention.py`, torch 2.14) all-gathers the other
ranks' keys and values (the default rotate method, `allgather`), runs the flash kernel chunk by
chunk and merges the partial outputs by their logsumexp; backward gathers them again and
reduce-scatters their gradients.

What the trace does beyond the library's public `context_parallel(mesh, buffers=...)`:
- the batch is made at the local length (seq_len / N) rather than sharded in place: under the
  fake process group the public API's in-place sharding gave empty shards on a sub-mesh, and
  the local tensors are what a rank holds either way;
- SDPA on the trace's CPU fake tensors would pick the CPU flash kernel, for which CP has no
  rule, so CUDA's flash kernel (`aten._scaled_dot_product_flash_attention`, whose fake kernel
  gives CUDA's output and float32 logsumexp) is called instead: the op CP's handler takes.
Both go through CP's private enable/disable functions, the ones its public API calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from workers.engine.compiled import CompiledJob
from workers.engine.errors import SpecError, Unsupported

FIELD = ("training", "parallelism", "context_parallel")
RING_ATTENTION = {"sdpa", "flash_attention_2"}  # what CP's SDPA handler can take


def check(job: CompiledJob) -> None:
    """422s at `training.parallelism.context_parallel` for what the ring cannot run."""
    n = job.training.parallelism.context_parallel
    if n == 1:
        return
    data = job.data
    if data.kind != "tokens":
        raise SpecError(FIELD, "context parallelism splits a token sequence: data.kind 'tokens'")
    if data.seq_len % (2 * n):
        raise SpecError(
            FIELD,
            f"seq_len {data.seq_len} must be a multiple of 2 x {n}: the load balancer gives "
            "each rank two of 2N equal chunks",
        )
    if not job.launch.causal_lm:
        raise SpecError(FIELD, "context parallelism is planned for transformers *ForCausalLM")
    attention = job.launch.attn_implementation
    if attention not in RING_ATTENTION:
        raise SpecError(
            FIELD,
            f"ring attention runs SDPA's kernels; attn_implementation {attention!r} is not one "
            "(use sdpa or flash_attention_2)",
        )
    if job.trace.rows != "whole":
        raise SpecError(
            FIELD,
            f"ring attention runs causal attention without a mask, and {data.batching} rows "
            "with sdpa give transformers one (padding or packed positions): use "
            "attn_implementation flash_attention_2",
        )


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA as CUDA's flash backend runs it (grouped-query keys and values as they are: the
    kernel takes fewer key/value heads). Named as `F`'s, which CP wraps by name."""
    if attn_mask is not None:
        raise Unsupported(
            FIELD, "context parallelism runs causal attention without a mask", "attention mask"
        )
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    return flash(query, key, value, dropout_p, is_causal, False, scale=scale)[0]


@contextmanager
def ring_attention(mesh: Any) -> Iterator[None]:
    """SDPA through CP's ring on `mesh` (the cp dimension), for one step's forward and
    backward."""
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    saved = (F.scaled_dot_product_attention, cp._dispatch_mode, cp._cp_options.enable_load_balance)
    F.scaled_dot_product_attention = scaled_dot_product_attention
    cp._dispatch_mode = cp._DispatchMode.MONKEY_PATCH
    cp._cp_options.enable_load_balance = True  # the default for causal attention
    cp._enable_context_parallel_dispatcher_impl(seq_dim=2, mesh=mesh)
    try:
        yield
    finally:
        cp._disable_context_parallel_dispatcher_impl()
        F.scaled_dot_product_attention, cp._dispatch_mode = saved[0], saved[1]
        cp._cp_options.enable_load_balance = saved[2]
