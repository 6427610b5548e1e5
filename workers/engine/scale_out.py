"""The fewest GPUs: the smallest world size at which a strategy fits a micro-batch of one.

World sizes a scheduler hands out are powers of two up to a node, then whole nodes. Per-rank
memory under a strategy that shards falls as a + b / world_size (the sharded states divide, the
activations and the gathered block do not), so two traced world sizes predict the answer and
two more confirm it exactly: the answer fits, the world size below it does not. Each is one traced
step at micro-batch 1 under a fake process group of that size.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from workers.engine.compiled import CompiledJob
from workers.engine.devices import ProbeDevice, TrialOutcome, open_session
from workers.engine.errors import BatchUndefined

MAX_WORLD = 1 << 16


def world_sizes(gpus_per_node: int, upto: int) -> list[int]:
    """1, 2, 4 ... up to a node, then 2, 3, 4 ... nodes."""
    out = []
    size = 1
    while size < gpus_per_node and size <= upto:
        out.append(size)
        size *= 2
    nodes = 1
    while nodes * gpus_per_node <= upto:
        out.append(nodes * gpus_per_node)
        nodes += 1 if nodes < 64 else nodes // 8
    return out


@dataclass
class ScaleOutAnswer:
    strategy: str
    world_size: int | None  # None: no world size fits a micro-batch of one
    checked: dict[int, TrialOutcome]


def fewest_gpus(
    job: CompiledJob,
    device: ProbeDevice,
    strategy: str,
    on_probe: Callable[[int, TrialOutcome], None] | None = None,
) -> ScaleOutAnswer:
    """The smallest world size (within the global batch: a sample per data-parallel rank, in
    whole context- and tensor-parallel groups) where `strategy` fits a micro-batch of one on
    `device` (of two where training is undefined at one)."""
    gpus = job.training.parallelism.gpus_per_node
    group = job.training.model_parallel_size  # context x tensor parallel ranks: whole groups
    sizes = world_sizes(gpus, min(MAX_WORLD, job.training.global_batch_size * group))
    sizes = [size for size in sizes if size % group == 0]
    checked: dict[int, TrialOutcome] = {}
    if not sizes:
        return ScaleOutAnswer(strategy, None, checked)

    def probe(size: int) -> TrialOutcome:
        if size not in checked:
            with open_session(device, job.with_world(strategy, size)) as session:
                try:
                    checked[size] = session.probe(1)
                except BatchUndefined as exc:  # BatchNorm at one value per channel
                    checked[size] = session.probe(exc.batch + 1)
            if on_probe is not None:
                on_probe(size, checked[size])
        return checked[size]

    limit = device.limit_bytes(job.search.headroom)
    if strategy in ("ddp", "none"):  # replicas do not shrink: one card's answer holds
        first = sizes[0] if strategy == "none" else sizes[min(1, len(sizes) - 1)]
        return ScaleOutAnswer(strategy, first if probe(first).fits else None, checked)
    low, high = sizes[min(1, len(sizes) - 1)], sizes[min(len(sizes) - 1, 4)]
    index = bisect.bisect_left(sizes, _predicted(probe(low), probe(high), low, high, limit))
    index = min(index, len(sizes) - 1)
    while not probe(sizes[index]).fits:  # the prediction was short: walk up
        if index == len(sizes) - 1:
            return ScaleOutAnswer(strategy, None, checked)
        index += 1
    while index > 0 and probe(sizes[index - 1]).fits:  # or long: walk down
        index -= 1
    return ScaleOutAnswer(strategy, sizes[index], checked)


def _predicted(a: TrialOutcome, b: TrialOutcome, wa: int, wb: int, limit: int) -> float:
    """World size where peak = fixed + sharded / world_size meets the limit."""
    if wa == wb:
        return wa
    sharded = (a.peak_bytes - b.peak_bytes) / (1 / wa - 1 / wb)
    fixed = a.peak_bytes - sharded / wa
    if sharded <= 0:
        return wa
    if fixed >= limit:
        return float("inf")
    return sharded / (limit - fixed)
