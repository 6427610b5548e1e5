"""Time one optimizer step spends in collectives, per strategy, from bytes over the links.

Ring collectives (NCCL's algorithm for large messages): an all-reduce moves 2(n-1)/n of the
buffer through each rank's link, an all-gather or a reduce-scatter (n-1)/n. Per optimizer step:
- ddp: one all-reduce of the gradients (accumulation micro-steps run under `no_sync`);
- zero1: that all-reduce, then an all-gather (broadcasts) of the updated parameters;
- fsdp / zero3: per micro-step, an all-gather of the parameters in forward and again in backward
  (once when parameters stay gathered: zero2, or reshard_after_forward false) and a
  reduce-scatter of the gradients;
- hybrid_shard: fsdp within the node, plus an all-reduce of the gradient shards across nodes.
A ring spanning nodes runs at the slower of the two links: NVLink/PCIe inside a node (the
catalogue's `INTRA_NODE_GBS`), the network between nodes (`INTER_NODE_GBS`, an assumption).

Overlap: DDP overlaps its all-reduce with backward and FSDP prefetches the next block's
parameters, so communication is taken as hidden behind compute up to the compute time; only the
excess adds to the step (`exposed`).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.engine.catalogue import INTER_NODE_GBS, GpuModel, intra_node_gbs

LOW_BYTES = {"bf16-mixed": 2, "fp16-mixed": 2, "bf16": 2}


@dataclass(frozen=True)
class StepTraffic:
    bytes_per_rank: float  # through each rank's link per optimizer step
    seconds: float
    link_gbs: float


def link_gbs(gpu: GpuModel, ranks: int, gpus_per_node: int) -> float:
    """A ring over `ranks` GPUs runs at its slowest hop."""
    if ranks <= gpus_per_node:
        return intra_node_gbs(gpu)
    return min(intra_node_gbs(gpu), INTER_NODE_GBS)


def ring(n: int, kind: str) -> float:
    """Fraction of the buffer each rank sends in a ring collective of n ranks."""
    if n <= 1:
        return 0.0
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n


def step_traffic(
    strategy: str,
    gpu: GpuModel,
    world_size: int,
    gpus_per_node: int,
    trainable: int,
    parameters: int,
    precision: str,
    accumulation: int,
    reshards_after_forward: bool = True,
    tensor_parallel: int = 1,
) -> StepTraffic | None:
    """Bytes and seconds of data-parallel communication per optimizer step; None for one
    process. Under tensor parallelism FSDP shards each rank's 1/tp of the parameters over the
    world_size / tp ranks that hold the same slice (strided by tp: across nodes as soon as the
    world is)."""
    if strategy == "none" or world_size <= 1:
        return None
    grad_bytes = trainable * (2 if precision == "bf16" else 4)
    gathered_bytes = parameters * LOW_BYTES.get(precision, 4)
    n = world_size
    if tensor_parallel > 1:  # fsdp over the data ranks, each moving its 1/tp slice
        dp = n // tensor_parallel
        per_micro = _fsdp_micro(
            dp,
            gathered_bytes / tensor_parallel,
            grad_bytes / tensor_parallel,
            reshards_after_forward,
        )
        return _timed(per_micro * accumulation, link_gbs(gpu, n, gpus_per_node))
    if strategy == "ddp":
        total = ring(n, "all_reduce") * grad_bytes
        return _timed(total, link_gbs(gpu, n, gpus_per_node))
    if strategy == "zero1":
        total = ring(n, "all_reduce") * grad_bytes + ring(n, "all_gather") * trainable * 4
        return _timed(total, link_gbs(gpu, n, gpus_per_node))
    shard = min(gpus_per_node, n) if strategy == "hybrid_shard" else n
    per_micro = _fsdp_micro(shard, gathered_bytes, grad_bytes, reshards_after_forward)
    seconds = per_micro * accumulation / (link_gbs(gpu, shard, gpus_per_node) * 1e9)
    total = per_micro * accumulation
    if strategy == "hybrid_shard" and n > shard:
        across = ring(n // shard, "all_reduce") * grad_bytes / shard
        total += across
        seconds += across / (INTER_NODE_GBS * 1e9)
    return StepTraffic(total, seconds, link_gbs(gpu, n, gpus_per_node))


def _timed(total: float, gbs: float) -> StepTraffic:
    return StepTraffic(total, total / (gbs * 1e9), gbs)


def exposed(communication_s: float, compute_s: float) -> float:
    """The part of the communication that compute does not hide."""
    return max(0.0, communication_s - compute_s)


def _fsdp_micro(shard: int, gathered_bytes: float, grad_bytes: float, reshards: bool) -> float:
    """FSDP's bytes per micro-step through a rank's link: the parameters all-gathered in
    forward and again in backward (once where they stay gathered), the gradients
    reduce-scattered. The embeddings and head under TP are counted split too (a slight
    undercount: TP leaves them whole)."""
    gathers = 2 if reshards else 1
    return (
        ring(shard, "all_gather") * gathered_bytes * gathers
        + ring(shard, "reduce_scatter") * grad_bytes
    )
