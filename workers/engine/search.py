"""Exact search for the largest micro-batch that fits, in few trials.

Peak memory grows close to affinely in the batch (fixed: weights, gradients, optimizer state;
per sample: the batch and the activations). So two probes predict the answer, and a secant
search on `peak(b) - limit`, kept inside the bracket [largest fit, smallest failure], confirms it:
it stops only once `answer` fits and `answer + 1` does not. A bisection step is forced whenever
the secant fails to halve the bracket, so the worst case stays logarithmic even when memory is
far from affine, or when confirmations keep creeping up by one (a staircase of allocator
segments, say). A probe whose peak is only a lower bound, as after a real CUDA OOM,
counts as a plain failure.

Two shortcuts come first where the device offers them. A `predict` callable (the simulated
device replays its allocator model on the allocation sequence extrapolated from two traces)
answers "does b fit?" in milliseconds, so the search probes only the predicted answer and
answer + 1: four trials in all. A `seed` (a real device's simulated twin's answer) is probed with
its neighbour before anything else: two real trials when the twin is right.

Lightning's binsearch doubles from 2 and then bisects (13-21 trials, not exact); Accelerate
multiplies by 0.9 from a start value on each OOM (never exact, never grows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.engine.devices.base import TrialOutcome
from workers.engine.errors import BatchUndefined

Probe = Callable[[int], TrialOutcome]
# A cheap prediction of whether a batch fits (None: no prediction), e.g. the simulated device's
# allocator replay on an extrapolated allocation sequence: milliseconds instead of a trace.
Predict = Callable[[int], bool | None]


@dataclass
class SearchResult:
    max_batch: int  # 0: not even one sample fits
    trials: list[TrialOutcome] = field(default_factory=list)
    bound_reached: bool = False
    min_batch: int = 1  # the smallest batch where training is defined (BatchNorm: see below)
    undefined_reason: str | None = None  # why the batches below min_batch do not train

    def outcome_at(self, batch: int) -> TrialOutcome | None:
        return next((t for t in self.trials if t.batch_size == batch), None)


class _Bracket:
    def __init__(self, probe: Probe, limit: int, max_batch: int) -> None:
        self.probe_fn = probe
        self.limit = limit
        self.lo = 0  # largest batch known to fit
        self.hi = max_batch + 1  # smallest batch known not to fit (max_batch + 1: the bound)
        self.hi_known = False
        self.points: dict[int, TrialOutcome] = {}
        self.trials: list[TrialOutcome] = []

    def probe(self, batch: int) -> TrialOutcome:
        outcome = self.probe_fn(batch)
        self.trials.append(outcome)
        self.points[batch] = outcome
        if outcome.fits:
            self.lo = max(self.lo, batch)
        elif batch < self.hi or not self.hi_known:
            self.hi = min(self.hi, batch)
            self.hi_known = True
        return outcome

    def exact_peak(self, batch: int) -> int | None:
        point = self.points.get(batch)
        if point is None or point.peak_is_lower_bound:
            return None
        return point.peak_bytes

    def smooth_peak(self, batch: int) -> int | None:
        """The allocated peak where the device reports it: it grows affinely with the batch,
        while the reserve needed steps with the allocator's segments."""
        point = self.points.get(batch)
        if point is None or point.peak_is_lower_bound:
            return None
        return point.allocated_bytes if point.allocated_bytes is not None else point.peak_bytes

    def predict(self) -> int:
        """Largest b with predicted peak(b) <= limit: a secant across the limit once a failure
        is known; before, the slope of the smooth figure below `lo`, from the exact peak at `lo`."""
        lo_peak = self.exact_peak(self.lo)
        lo_smooth = self.smooth_peak(self.lo)
        assert lo_peak is not None and lo_smooth is not None
        hi_peak = self.exact_peak(self.hi) if self.hi_known else None
        if hi_peak is not None and hi_peak > lo_peak:  # a secant across the limit
            slope = (hi_peak - lo_peak) / (self.hi - self.lo)
        else:
            below = [
                b
                for b, p in self.points.items()
                if b < self.lo and p.fits and not p.peak_is_lower_bound
            ]
            if not below:
                return self.lo * 2
            b0 = max(below)
            b0_smooth = self.smooth_peak(b0)
            assert b0_smooth is not None
            slope = (lo_smooth - b0_smooth) / (self.lo - b0)
        if slope <= 0:  # rounding hides the per-sample cost at this scale: grow fast
            return self.lo * 8
        return self.lo + math.floor((self.limit - lo_peak) / slope)


def _confirm_seed(
    bracket: _Bracket, seed: int, max_batch: int, min_batch: int
) -> SearchResult | None:
    """Probe the seed and its neighbour: the answer in two trials when the seed is right."""
    if bracket.probe(seed).fits:
        if seed == max_batch:
            return SearchResult(seed, bracket.trials, bound_reached=True)
        if not bracket.probe(seed + 1).fits:
            return SearchResult(seed, bracket.trials)
    elif seed > min_batch and bracket.probe(seed - 1).fits:
        return SearchResult(seed - 1, bracket.trials)
    return None


def predicted_answer(predict: Predict, lo: int, hi: int) -> int | None:
    """The largest batch in [lo, hi) that `predict` says fits (lo is known to fit), by
    doubling then bisecting on predictions alone; None where there is no prediction."""
    if hi - lo <= 1:
        return lo
    first = predict(lo + 1)
    if first is None:
        return None
    if not first:
        return lo
    good, bad = lo + 1, hi
    step = max(1, good)
    while good + step < bad:
        if predict(good + step):
            good, step = good + step, step * 2
        else:
            bad = good + step
            break
    while bad - good > 1:
        mid = (good + bad) // 2
        if predict(mid):
            good = mid
        else:
            bad = mid
    return good


MAX_UNDEFINED = 8  # BatchNorm needs 2; a spec whose training is undefined further up is odd


def find_max_batch(
    probe: Probe,
    limit: int,
    max_batch: int,
    predict: Predict | None = None,
    seed: int | None = None,
) -> SearchResult:
    """The exact largest batch in [1, max_batch] whose probe fits; 0 when none does.
    With `predict`, probes go where the prediction puts the answer and its neighbour; with
    `seed` (a simulated answer for a real device), the seed and seed + 1 are probed first. The
    secant and bisection safeguards still bound the trials when predictions miss. Where
    training is undefined at a small batch (a probe raises BatchUndefined), the search starts
    again just above it: that batch is not an out-of-memory failure."""
    min_batch, reason = 1, None
    while True:
        try:
            result = _search(probe, limit, max_batch, predict, seed, min_batch)
        except BatchUndefined as exc:
            if exc.batch < min_batch or exc.batch >= min(max_batch, MAX_UNDEFINED):
                raise
            min_batch, reason = exc.batch + 1, exc.reason
            continue
        result.min_batch, result.undefined_reason = min_batch, reason
        return result


def _search(
    probe: Probe,
    limit: int,
    max_batch: int,
    predict: Predict | None,
    seed: int | None,
    min_batch: int,
) -> SearchResult:
    bracket = _Bracket(probe, limit, max_batch)
    if seed is not None and min_batch <= seed <= max_batch:
        confirmed = _confirm_seed(bracket, seed, max_batch, min_batch)
        if confirmed is not None:
            return confirmed
    if bracket.lo == 0 and (min_batch in bracket.points or not bracket.probe(min_batch).fits):
        return SearchResult(0, bracket.trials)
    if max_batch == min_batch:
        return SearchResult(min_batch, bracket.trials, bound_reached=True)
    if bracket.lo < min_batch + 1 < bracket.hi:
        bracket.probe(min_batch + 1)
    width_before = bracket.hi - bracket.lo
    creep = 0  # confirmations in a row that fitted: the model keeps under-predicting
    # Once per search, a guess right under a failure is probed even when the bracket did not
    # halve: a secant that lands one above the answer (rounding of the peaks it starts from)
    # then confirms from above instead of bisecting all over again.
    above_unused = True
    while bracket.hi - bracket.lo > 1:
        predicted = predicted_answer(predict, bracket.lo, bracket.hi) if predict else None
        guess = predicted if predicted is not None else bracket.predict()
        width = bracket.hi - bracket.lo
        confirming = guess <= bracket.lo  # the model says lo is the answer: probe lo + 1
        candidate = min(
            max(bracket.lo + 1 if confirming else guess, bracket.lo + 1), bracket.hi - 1
        )
        beyond_bound = not bracket.hi_known and guess >= bracket.hi - 1
        # Below an unknown bound the extrapolation from fits converges by itself; a bracket
        # that does not halve between two known ends means the secant has stalled.
        stalled = (
            not confirming
            and width > 4
            and width * 2 > width_before
            and (bracket.hi_known or len(bracket.trials) > 8)
        )
        from_above = bracket.hi_known and not confirming and candidate == bracket.hi - 1
        if stalled and from_above and above_unused:
            stalled = above_unused = False
        if not beyond_bound and len(bracket.trials) > 3 and (stalled or creep >= 2):
            candidate = (
                bracket.lo + bracket.hi
            ) // 2  # the model is not to be trusted here: bisect
            creep = 0
        width_before = width
        fits = bracket.probe(candidate).fits
        creep = creep + 1 if confirming and fits and candidate == bracket.lo else 0
    bound = bracket.lo == max_batch
    return SearchResult(bracket.lo, bracket.trials, bound_reached=bound)
