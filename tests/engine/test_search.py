"""The batch search lands exactly on the largest fitting batch, in few trials, whatever the
shape of the memory curve; and never claims a batch it did not probe."""

from __future__ import annotations

import math
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.devices.base import TrialOutcome
from workers.engine.search import find_max_batch


def make_probe(
    peak: Callable[[int], int], limit: int, lower_bound_on_fail: bool = False
) -> tuple[Callable[[int], TrialOutcome], list[int]]:
    calls: list[int] = []

    def probe(b: int) -> TrialOutcome:
        calls.append(b)
        p = peak(b)
        fits = p <= limit
        return TrialOutcome(
            b,
            fits,
            p if fits or not lower_bound_on_fail else limit // 2,
            0.0,
            peak_is_lower_bound=lower_bound_on_fail and not fits,
        )

    return probe, calls


def oracle(peak: Callable[[int], int], limit: int, max_batch: int) -> int:
    best = 0
    for b in range(1, max_batch + 1):
        if peak(b) <= limit:
            best = b
        else:
            break
    return best


def check_exact(
    peak: Callable[[int], int], limit: int, max_batch: int, lower_bound: bool = False
) -> int:
    probe, calls = make_probe(peak, limit, lower_bound)
    result = find_max_batch(probe, limit, max_batch)
    expected = oracle(peak, limit, max_batch)
    assert result.max_batch == expected
    if expected:
        assert expected in calls  # the answer itself was probed and fits
    if 0 < expected < max_batch:
        assert expected + 1 in calls  # and answer + 1 was probed and failed
    assert len(calls) == len(set(calls)), "no batch is probed twice"
    return len(calls)


def test_affine_memory_is_found_in_five_trials_or_fewer() -> None:
    peak = lambda b: 1_000_000 + 37_123 * b  # noqa: E731
    assert check_exact(peak, 40_000_000, 65536) <= 5


def test_allocator_rounding_does_not_break_exactness() -> None:
    peak = lambda b: 512 * math.ceil((3_000_000 + 12_345 * b) / 2**21) * 4096  # noqa: E731
    assert check_exact(peak, 2**31, 65536) <= 8


def test_superlinear_memory_still_exact_and_logarithmic() -> None:
    peak = lambda b: 1000 + 10 * b + b * b  # noqa: E731
    trials = check_exact(peak, 10**8, 65536)
    assert trials <= 2 * math.ceil(math.log2(65536)) + 3


def test_oom_without_peak_figure_falls_back_to_bisection() -> None:
    peak = lambda b: 5_000 + 300 * b  # noqa: E731
    trials = check_exact(peak, 3_000_000, 65536, lower_bound=True)
    assert trials <= 2 * math.ceil(math.log2(65536)) + 3


def test_nothing_fits() -> None:
    probe, calls = make_probe(lambda b: 10**12, 10**9)
    result = find_max_batch(probe, 10**9, 1024)
    assert result.max_batch == 0 and calls == [1]


def test_bound_reached_when_max_batch_fits() -> None:
    probe, calls = make_probe(lambda b: 100 + b, 10**9)
    result = find_max_batch(probe, 10**9, 4096)
    assert result.max_batch == 4096 and result.bound_reached
    assert len(calls) <= 4


def test_max_batch_of_one() -> None:
    probe, _ = make_probe(lambda b: 100 + b, 10**9)
    assert find_max_batch(probe, 10**9, 1).max_batch == 1


def _largest_fitting(peak: Callable[[int], int], limit: int, max_batch: int) -> int:
    """Closed-form oracle for a monotone curve, by bisection over the whole range."""
    lo, hi = 0, max_batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


@settings(max_examples=500, deadline=None)
@given(
    fixed=st.integers(0, 10**10),
    per_sample=st.integers(1, 10**8),
    limit=st.integers(10**6, 10**11),
    rounding=st.sampled_from([1, 512, 2**20, 2**21]),
    max_batch=st.integers(1, 1 << 16),
)
def test_exact_on_any_affine_curve_with_rounding(
    fixed: int, per_sample: int, limit: int, rounding: int, max_batch: int
) -> None:
    """Whatever the rounding (even segments far larger than a sample, a staircase), the answer
    is exact and the trials stay logarithmic."""

    def peak(b: int) -> int:
        return rounding * math.ceil((fixed + per_sample * b) / rounding)

    probe, calls = make_probe(peak, limit)
    result = find_max_batch(probe, limit, max_batch)
    assert result.max_batch == _largest_fitting(peak, limit, max_batch)
    assert len(calls) <= 2 * math.ceil(math.log2(max_batch + 1)) + 4


@settings(max_examples=500, deadline=None)
@given(
    fixed=st.integers(0, 10**10),
    per_sample=st.integers(512, 10**8),
    limit=st.integers(10**6, 10**11),
    max_batch=st.integers(1, 1 << 16),
)
def test_realistic_curves_take_at_most_six_trials(
    fixed: int, per_sample: int, limit: int, max_batch: int
) -> None:
    """With the CUDA allocator's 512-byte blocks and a sample costing at least a block (every
    real model), two probes predict the answer and at most four more confirm it."""

    def peak(b: int) -> int:
        return 512 * math.ceil((fixed + per_sample * b) / 512)

    probe, calls = make_probe(peak, limit)
    result = find_max_batch(probe, limit, max_batch)
    assert result.max_batch == _largest_fitting(peak, limit, max_batch)
    assert len(calls) <= 6
