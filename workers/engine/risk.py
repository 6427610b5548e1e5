"""How far a simulated plan may be from the real card: its chance of running out of memory and
an interval for its throughput, both from the simulator's errors on published GPU measurements.

Memory: the real peak over the simulated peak of the same step, r, is log-normal,
ln r ~ Normal(mu, sigma). Published measurements rarely give r itself: timm's benchmark gives a
bracket (a batch that ran, the next one up that ran out of memory), which bounds r between
capacity / predicted peak at each end; `fit_log_normal` fits mu and sigma to such intervals by
maximum likelihood (interval-censored), with the few point measurements (nvidia-smi readings)
as they are. A plan whose predicted peak is P on a card of capacity C then runs out of memory with
probability P(r > C / P).

Throughput: measured over predicted samples/s on the same rows; the plan's band is the
estimate times that ratio's 10th and 90th percentiles (75% of rows inside, out of family).

`bench/calibrate.py` fits both from `bench.fidelity --published` and `--timm` and prints the
constants below; they are set from its output, never fitted per case.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING

from service.schemas.result import Risk, RiskPoint

if TYPE_CHECKING:  # devices import the compiled job, which reads PEAK_SPREAD
    from workers.engine.devices.base import TrialOutcome

# The default search.headroom is the smallest headroom whose OOM rate on the calibration set,
# by this model, stays at or below this (issue 29).
TARGET_OOM_RATE = 0.01


@dataclass(frozen=True)
class Censored:
    """One observation of ln(real / predicted): in (low, high]; None is unbounded; low == high
    is a point measurement."""

    low: float | None
    high: float | None


@dataclass(frozen=True)
class Readings:
    """n point measurements of ln(real / predicted) given by their mean and (population)
    standard deviation: what `GET /v1/fidelity` aggregates, and all a normal fit needs."""

    n: int
    mean: float
    sd: float


@dataclass(frozen=True)
class PeakSpread:
    """ln(real peak / simulated peak) ~ Normal(mu, sigma)."""

    mu: float
    sigma: float

    def oom_probability(self, peak_bytes: int, capacity_bytes: int) -> float:
        """Chance that a step the simulator puts at `peak_bytes` exceeds `capacity_bytes`."""
        if peak_bytes <= 0:
            return 0.0
        if capacity_bytes <= 0:
            return 1.0
        margin = math.log(capacity_bytes / peak_bytes)
        return 1.0 - NormalDist(self.mu, self.sigma).cdf(margin)

    def headroom_for(self, rate: float) -> float:
        """The headroom h such that a plan whose peak reaches the limit, (1 - h) x capacity,
        runs out of memory with probability `rate` (plans below the limit: less)."""
        z = NormalDist(self.mu, self.sigma).inv_cdf(1.0 - rate)
        return max(0.0, 1.0 - math.exp(-z))


@dataclass(frozen=True)
class ThroughputSpread:
    """Measured / predicted samples/s: its low and high quantiles and the share between."""

    low: float
    high: float
    coverage: float

    def band(self, samples_per_second: float) -> tuple[float, float]:
        return samples_per_second * self.low, samples_per_second * self.high


# Fitted by `.venv/bin/python -m bench.calibrate` on bench/results/fidelity_timm.json (timm's
# RTX 3090 rows, every 20th: 104) and fidelity_published.json (10 published cases): 86 brackets,
# 26 rows with no failing batch, 2 nvidia-smi readings. The simulator's peak is on average 2.1%
# under the real one (the usable memory, the allocator and cuDNN's workspaces together), with a
# spread of 3.2%; by family fold the fit moves within mu 0.019-0.022, sigma 0.023-0.034
# (BENCHMARKS.md, "Session 15"). The default search.headroom, 9%, is the smallest half-percent
# step at which the calibration rows' plans run out of memory at most 1% of the time (0.77%).
PEAK_SPREAD = PeakSpread(mu=0.0212, sigma=0.0317)
# Measured / estimated samples/s over the same 114 rows: 10th and 90th percentiles. The
# coverage stated is out of family: each fold of timm's families judged by the band the other
# rows give holds 75% (in sample, 79%).
THROUGHPUT_SPREAD = ThroughputSpread(low=0.624, high=1.297, coverage=0.75)
CALIBRATION = (
    "timm's RTX 3090 training benchmark (104 rows) and 10 published GPU cases (bench.calibrate)"
)


def fit_log_normal(
    observations: Iterable[Censored], readings: Iterable[Readings] = ()
) -> PeakSpread:
    """Maximum-likelihood mu and sigma of interval-censored normal data, with groups of point
    readings (coordinate search on the log-likelihood, smooth and unimodal for such data)."""
    data, groups = list(observations), [g for g in readings if g.n > 0]
    if not data and not groups:
        raise ValueError("no observations")

    def log_likelihood(mu: float, sigma: float) -> float:
        dist, total = NormalDist(mu, sigma), 0.0
        for o in data:
            if o.low is not None and o.high is not None and o.low == o.high:
                total += math.log(max(dist.pdf(o.low), 1e-300))
                continue
            upper = dist.cdf(o.high) if o.high is not None else 1.0
            lower = dist.cdf(o.low) if o.low is not None else 0.0
            total += math.log(max(upper - lower, 1e-300))
        for g in groups:  # sum of n normal log-densities, from the group's two moments
            spread = g.sd**2 + (g.mean - mu) ** 2
            total -= g.n * (math.log(sigma * math.sqrt(2 * math.pi)) + spread / (2 * sigma**2))
        return total

    mu, log_sigma, step = 0.0, math.log(0.1), 0.25
    best = log_likelihood(mu, math.exp(log_sigma))
    while step > 1e-5:
        improved = False
        for d_mu, d_ls in ((step, 0), (-step, 0), (0, step), (0, -step)):
            candidate = log_likelihood(mu + d_mu * 0.2, math.exp(log_sigma + d_ls))
            if candidate > best + 1e-12:
                mu, log_sigma, best, improved = mu + d_mu * 0.2, log_sigma + d_ls, candidate, True
        if not improved:
            step /= 2
    return PeakSpread(mu=mu, sigma=math.exp(log_sigma))


def simulated_peak_at(trials: Sequence[TrialOutcome], batch: int) -> float | None:
    """The simulator's peak at `batch` from its probes: the probe itself, or the line through
    the two probes nearest to it (the simulated peak is affine in the batch between probes;
    the allocator's rounding is what bends it). None with fewer than two usable probes."""
    points = exact_peaks(trials)
    if batch in points:
        return float(points[batch])
    nearest = sorted(points, key=lambda b: (abs(b - batch), b))[:2]
    if len(nearest) < 2:
        return None
    (b0, b1) = sorted(nearest)
    slope = (points[b1] - points[b0]) / (b1 - b0)
    return points[b0] + slope * (batch - b0)


def exact_peaks(trials: Sequence[TrialOutcome]) -> dict[int, int]:
    """Each probed batch's peak, where the probe measured it (a lower bound says nothing
    exact: left out)."""
    return {t.batch_size: t.peak_bytes for t in trials if not t.peak_is_lower_bound}


def assess(
    probed: Sequence[TrialOutcome],
    micro_batch: int,
    max_batch: int,
    capacity_bytes: int,
    headroom: float,
) -> Risk:
    """The plan's risk at its recommended micro-batch, at the largest that fits, and at each
    batch the search probed (`probed` holds both)."""
    spread = PEAK_SPREAD
    peaks = exact_peaks(probed)
    chance = {b: spread.oom_probability(peak, capacity_bytes) for b, peak in peaks.items()}
    return Risk(
        by_micro_batch=[RiskPoint(micro_batch=b, oom_probability=chance[b]) for b in sorted(peaks)],
        headroom=headroom,
        oom_probability=chance[micro_batch],
        max_micro_batch_oom_probability=chance[max_batch],
        peak_fraction=peaks[micro_batch] / capacity_bytes if capacity_bytes else math.inf,
        headroom_for_one_percent=spread.headroom_for(TARGET_OOM_RATE),
        log_ratio_mean=spread.mu,
        log_ratio_sd=spread.sigma,
        calibration=CALIBRATION,
    )
