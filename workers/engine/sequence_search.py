"""The longest sequence that fits: `search.target: "sequence_length"`.

Peak memory grows with the sequence much as it does with the batch (close to affinely; the
attention scores of an eager kernel add a square term), so the same exact search that finds the
largest micro-batch finds the longest sequence: its unknown is the number of granules `k`
(seq_len = k x granularity, up to the spec's data.seq_len), each probe one traced step at
`search.sequence_micro_batch` with the data's seq_len set to that length. The answer fits and one
granule more does not, both probed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from workers.engine.compiled import CompiledJob
from workers.engine.devices import ProbeDevice, TrialOutcome, open_session
from workers.engine.errors import SpecError
from workers.engine.search import find_max_batch


@dataclass
class SequenceAnswer:
    micro_batch: int
    granularity: int
    max_seq_len: int  # 0: not even one granule fits
    bound_reached: bool
    checked: dict[int, TrialOutcome] = field(default_factory=dict)  # seq_len -> outcome


def check_target(job: CompiledJob) -> None:
    """What the schema cannot see: a sequence-length search needs token data at least one
    granule long; batches in tokens need token data."""
    search, data = job.search, job.data
    if job.training.batch_unit == "tokens" and data.kind != "tokens":
        raise SpecError(
            ("training", "batch_unit"),
            "batches in tokens need token data (data.kind 'tokens'): count samples instead",
        )
    if search.target != "sequence_length":
        return
    if data.kind != "tokens":
        raise SpecError(
            ("search", "target"), "a sequence-length search needs token data (data.kind 'tokens')"
        )
    if search.sequence_granularity > data.seq_len:
        raise SpecError(
            ("search", "sequence_granularity"),
            f"granularity {search.sequence_granularity} is longer than data.seq_len "
            f"{data.seq_len}, the longest sequence searched",
        )


def with_seq_len(job: CompiledJob, seq_len: int) -> CompiledJob:
    return job.with_data(job.data.model_copy(update={"seq_len": seq_len}))


def longest_sequence(
    job: CompiledJob,
    device: ProbeDevice,
    on_probe: Callable[[int, TrialOutcome], None] | None = None,
) -> SequenceAnswer:
    """The longest multiple of the granularity, up to data.seq_len, at which the micro-batch
    fits on `device`."""
    check_target(job)
    assert job.data.kind == "tokens"
    granule, micro = job.search.sequence_granularity, job.search.sequence_micro_batch
    granules = job.data.seq_len // granule
    checked: dict[int, TrialOutcome] = {}

    def probe(k: int) -> TrialOutcome:
        seq_len = k * granule
        if seq_len not in checked:
            with open_session(device, with_seq_len(job, seq_len)) as session:
                checked[seq_len] = session.probe(micro)
            if on_probe is not None:
                on_probe(seq_len, checked[seq_len])
        return checked[seq_len]

    found = find_max_batch(probe, device.limit_bytes(job.search.headroom), granules)
    return SequenceAnswer(
        micro_batch=micro,
        granularity=granule,
        max_seq_len=found.max_batch * granule,
        bound_reached=found.bound_reached,
        checked=checked,
    )
