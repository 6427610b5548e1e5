"""Token data as it is: samples of many lengths, padded or packed (`data.lengths`,
`data.batching`).

The lengths become a distribution (512 equally likely lengths read off the percentiles' or the
histogram's piecewise-linear CDF). What each batching mode means for the plan:

- `pad_to_max`: every sample is seq_len tokens: memory and time at seq_len, as without lengths;
  the padding is reported.
- `pad_to_longest` (a collator that pads each batch to its longest sample): memory is planned
  for the worst case, a batch holding the longest sample, so the traced rows are that long; the
  time is the traced step's scaled to the expected padded length of a batch of b samples,
  E[max of b lengths] (linear in tokens: the attention's square term is not rescaled).
- `packed` (samples concatenated into rows of seq_len tokens, document boundaries kept by
  varlen attention or padding-free collation): the traced rows are seq_len tokens, nothing is
  padding, and a row holds seq_len / mean length samples on average. The plan's batch
  arithmetic runs in rows: the global batch (and base_batch_size, and the epoch's samples) in
  samples become rows before the plan, so micro-batch x accumulation x world size reaches the
  samples asked for on average, and the LR rule moves with the same ratio.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace

from service.schemas.result import PlanResult, TokenBatching
from service.schemas.spec import TokenLengths
from workers.engine.compiled import CompiledJob

SAMPLES = 512


@dataclass(frozen=True)
class LengthDistribution:
    lengths: tuple[float, ...]  # SAMPLES equally likely lengths, ascending
    longest: int  # the longest sample the spec names (the samples stop short of it)

    @property
    def mean(self) -> float:
        return sum(self.lengths) / len(self.lengths)

    def expected_longest_of(self, batch: int) -> float:
        """E[max of `batch` independent lengths]: P(max <= L_(i)) = (i / n) ** batch."""
        n = len(self.lengths)
        return sum(
            length * ((i / n) ** batch - ((i - 1) / n) ** batch)
            for i, length in enumerate(self.lengths, start=1)
        )


def distribution(lengths: TokenLengths) -> LengthDistribution:
    knots = _cdf_knots(lengths)
    probabilities = [p for p, _ in knots]
    out = []
    for i in range(SAMPLES):
        u = (i + 0.5) / SAMPLES
        j = min(max(bisect.bisect_left(probabilities, u), 1), len(knots) - 1)
        (p0, l0), (p1, l1) = knots[j - 1], knots[j]
        share = 0.0 if p1 == p0 else (u - p0) / (p1 - p0)
        out.append(max(1.0, l0 + share * (l1 - l0)))
    return LengthDistribution(tuple(sorted(out)), lengths.longest)


def _cdf_knots(lengths: TokenLengths) -> list[tuple[float, float]]:
    """(cumulative probability, length) pairs, straight lines between them."""
    if lengths.percentiles is not None:
        points = lengths.points()
        knots = [(p / 100, float(length)) for p, length in points]
        if knots[0][0] > 0:
            knots.insert(0, (0.0, knots[0][1]))
        return knots
    assert lengths.histogram is not None
    total = sum(b.count for b in lengths.histogram)
    knots, seen, lower = [(0.0, 1.0)], 0, 1.0
    for b in lengths.histogram:
        if b.count:
            knots.append((seen / total, lower))  # the bin starts where the last one ended
            seen += b.count
            knots.append((seen / total, float(b.up_to)))
        lower = float(b.up_to)
    return knots


@dataclass(frozen=True)
class Batching:
    """What the plan needs to know of the data's batching, and the rows it traced."""

    mode: str
    seq_len: int  # the spec's
    traced_len: int  # the rows' length in the trace
    lengths: LengthDistribution
    asked_global_batch: int  # as the spec says, in `unit`
    unit: str = "samples"  # samples | tokens

    @property
    def samples_per_row(self) -> float:
        return self.seq_len / self.lengths.mean if self.mode == "packed" else 1.0


def prepare(job: CompiledJob) -> tuple[CompiledJob, Batching | None]:
    """The job the plan traces and counts: rows of the longest sample for pad_to_longest;
    batches given in tokens counted in samples; for packed, batches and the epoch in rows."""
    data = job.data
    if data.kind != "tokens":
        return job, None
    training = job.training
    lengths = distribution(data.lengths) if data.lengths is not None else None
    batching = None
    if lengths is not None:
        batching = Batching(
            mode=data.batching,
            seq_len=data.seq_len,
            traced_len=data.seq_len,
            lengths=lengths,
            asked_global_batch=training.global_batch_size,
            unit=training.batch_unit,
        )
        if data.batching == "pad_to_longest" and lengths.longest < data.seq_len:
            batching = replace(batching, traced_len=lengths.longest)
            job = job.with_data(data.model_copy(update={"seq_len": lengths.longest}))
    # what one unit of the plan's batches holds: a sample, or (packed) a row of seq_len tokens
    per_row = batching.samples_per_row if batching is not None else 1.0
    if training.batch_unit == "tokens":
        tokens_per_unit = lengths.mean * per_row if lengths is not None else data.seq_len
        job = _recounted(job, batches=tokens_per_unit, epoch=per_row)
    elif per_row != 1.0:
        job = _recounted(job, batches=per_row, epoch=per_row)
    return job, batching


def _recounted(job: CompiledJob, *, batches: float, epoch: float) -> CompiledJob:
    """The global and reference batches divided by `batches` (what one unit of the plan's
    batches holds, in the spec's unit), the epoch's samples by `epoch` (samples per unit)."""

    def units(amount: int, per_unit: float) -> int:
        return max(1, math.ceil(amount / per_unit))

    training = job.training
    update = {"global_batch_size": units(training.global_batch_size, batches)}
    if training.base_batch_size is not None:
        update["base_batch_size"] = units(training.base_batch_size, batches)
    job = job.with_training(training.model_copy(update=update))
    samples = units(job.data.num_samples, epoch)
    return job.with_data(job.data.model_copy(update={"num_samples": samples}))


def report(batching: Batching, result: PlanResult) -> TokenBatching:
    """The batching's figures at the plan's micro-batch; scales the plan's time to the tokens a
    padded batch really computes."""
    micro = max(result.micro_batch_size, 1)
    lengths, mode = batching.lengths, batching.mode
    computed: float
    samples: float
    if mode == "packed":
        computed = micro * batching.seq_len
        samples = micro * batching.samples_per_row
    elif mode == "pad_to_longest":
        computed = micro * lengths.expected_longest_of(micro)
        samples = micro
    else:
        computed = micro * batching.seq_len
        samples = micro
    real = samples * lengths.mean
    padded_to_max = 1 - lengths.mean / batching.seq_len
    scale = computed / (micro * batching.traced_len)
    if result.throughput is not None and scale != 1:
        _scale_time(result, scale)
    if result.throughput is not None and mode == "packed":
        _per_sample(result, batching.samples_per_row)
    return TokenBatching(
        batching=mode,
        batch_unit="rows" if mode == "packed" else "samples",
        mean_length=round(lengths.mean, 1),
        longest=lengths.longest,
        traced_length=batching.traced_len,
        samples_per_micro_batch=round(samples, 2),
        tokens_per_micro_batch=round(computed, 1),
        real_tokens_per_micro_batch=round(real, 1),
        padding_fraction=round(max(0.0, 1 - real / computed), 4),
        padding_fraction_pad_to_max=round(padded_to_max, 4),
        global_batch_samples=(
            batching.asked_global_batch
            if batching.unit == "samples"
            else math.ceil(batching.asked_global_batch / lengths.mean)
        ),
        effective_global_batch_samples=round(
            result.effective_global_batch_size * batching.samples_per_row, 1
        ),
        global_batch_tokens=(
            batching.asked_global_batch
            if batching.unit == "tokens"
            else round(batching.asked_global_batch * lengths.mean)
        ),
        effective_global_batch_tokens=round(
            result.effective_global_batch_size * batching.samples_per_row * lengths.mean
        ),
    )


def _per_sample(result: PlanResult, samples_per_row: float) -> None:
    """The plan counted rows; a row holds `samples_per_row` samples on average."""
    t = result.throughput
    assert t is not None
    update: dict[str, object] = {"samples_per_second": t.samples_per_second * samples_per_row}
    if t.samples_per_second_band is not None:
        low, high = t.samples_per_second_band
        update["samples_per_second_band"] = (low * samples_per_row, high * samples_per_row)
    if t.flops_per_sample is not None:
        update["flops_per_sample"] = t.flops_per_sample / samples_per_row
    result.throughput = t.model_copy(update=update)


def _scale_time(result: PlanResult, scale: float) -> None:
    """A padded batch computes `scale` times the traced tokens: its step takes that much."""
    t = result.throughput
    assert t is not None
    update: dict[str, object] = {
        "step_time_s": t.step_time_s * scale,
        "epoch_time_s": t.epoch_time_s * scale,
        "total_time_s": t.total_time_s * scale,
        "samples_per_second": t.samples_per_second / scale,
    }
    if t.samples_per_second_band is not None:
        low, high = t.samples_per_second_band
        update["samples_per_second_band"] = (low / scale, high / scale)
    result.throughput = t.model_copy(update=update)
