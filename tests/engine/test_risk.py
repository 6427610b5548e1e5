"""The plan's risk: the OOM probability model, its fit on censored data, and the plan's field."""

from __future__ import annotations

import math
import random
from statistics import NormalDist

import numpy as np
import pytest

from bench.calibrate import (
    band_coverage_by_family,
    deciles,
    expected_oom_rate,
    load,
    observations,
    oom_rate,
)
from service.schemas.spec import PlanSpec, SearchSpec
from workers import engine
from workers.engine.devices.base import TrialOutcome
from workers.engine.errors import SpecError
from workers.engine.risk import (
    PEAK_SPREAD,
    TARGET_OOM_RATE,
    THROUGHPUT_SPREAD,
    Censored,
    PeakSpread,
    Readings,
    fit_log_normal,
    simulated_peak_at,
)

GIB = 1 << 30


def test_the_fit_recovers_a_known_normal_from_brackets_alone() -> None:
    """Draws of ln r seen only as timm sees them: between two batches' bounds (steps of 25-50%
    in peak), some rows with no failing batch, a few readings as points."""
    rng, mu, sigma = random.Random(7), 0.03, 0.06
    data = []
    for i in range(600):
        x = rng.gauss(mu, sigma)
        if i % 50 == 0:
            data.append(Censored(low=x, high=x))
            continue
        width = math.log(rng.uniform(1.25, 1.5))
        high = x + rng.uniform(0, width)  # ln(C / P(fits)) >= x: the batch ran
        low = None if i % 7 == 0 else high - width  # ln(C / P(fails)) < x: it ran out
        data.append(Censored(low=low, high=high))
    fitted = fit_log_normal(data)
    assert fitted.mu == pytest.approx(mu, abs=0.01)
    assert fitted.sigma == pytest.approx(sigma, rel=0.2)


def test_the_oom_probability_is_the_normal_tail_beyond_the_margin() -> None:
    spread = PeakSpread(mu=0.02, sigma=0.05)
    capacity = 24 * GIB
    at_median = int(capacity / math.exp(spread.mu))
    assert spread.oom_probability(at_median, capacity) == pytest.approx(0.5, abs=1e-6)
    peaks = [int(capacity * f) for f in (0.7, 0.8, 0.9, 0.95, 1.0, 1.05)]
    chances = [spread.oom_probability(p, capacity) for p in peaks]
    assert chances == sorted(chances) and chances[0] < 1e-6 and chances[-1] > 0.5
    # Two sigmas above the mean of ln r: the normal's upper tail, 2.28%.
    two_sigma = int(capacity / math.exp(spread.mu + 2 * spread.sigma))
    assert spread.oom_probability(two_sigma, capacity) == pytest.approx(0.02275, abs=2e-4)


def test_the_headroom_for_a_rate_puts_a_plan_at_its_limit_at_that_rate() -> None:
    spread = PeakSpread(mu=0.01, sigma=0.04)
    for rate in (0.05, 0.01, 0.001):
        h = spread.headroom_for(rate)
        capacity = 80 * GIB
        assert spread.oom_probability(int((1 - h) * capacity), capacity) == pytest.approx(
            rate, rel=1e-3
        )
    assert spread.headroom_for(0.001) > spread.headroom_for(0.01) > spread.headroom_for(0.05)


def test_the_constants_are_the_fit_of_the_committed_calibration_rows() -> None:
    """issue 29: PEAK_SPREAD and the band are what bench.calibrate fits on the committed
    results, and the default headroom is the smallest half-percent step at which those rows'
    plans run out of memory at most 1% of the time (a constant changed without a refit, or a
    refit without the constants, fails here)."""
    rows = load("fidelity_timm") + load("fidelity_published")
    assert len(rows) > 100
    fitted = fit_log_normal(observations(rows))
    assert fitted.mu == pytest.approx(PEAK_SPREAD.mu, abs=5e-4)
    assert fitted.sigma == pytest.approx(PEAK_SPREAD.sigma, abs=5e-4)
    default = SearchSpec().headroom
    assert expected_oom_rate(rows, PEAK_SPREAD, default) <= TARGET_OOM_RATE
    assert expected_oom_rate(rows, PEAK_SPREAD, default - 0.005) > TARGET_OOM_RATE
    ratios = [r["measured_sps"] / r["predicted_sps"] for r in rows if r.get("predicted_sps")]
    # the band's ends: numpy's linear-interpolated 10th and 90th percentiles of those ratios
    assert deciles(ratios) == pytest.approx(tuple(np.quantile(ratios, [0.1, 0.9])))
    assert THROUGHPUT_SPREAD.low == pytest.approx(deciles(ratios)[0], abs=5e-4)
    assert THROUGHPUT_SPREAD.high == pytest.approx(deciles(ratios)[1], abs=5e-4)
    by_source = {"timm": load("fidelity_timm"), "published": load("fidelity_published")}
    coverage = band_coverage_by_family(by_source, folds=5)  # the coverage stated: out of family
    assert coverage is not None
    assert THROUGHPUT_SPREAD.coverage == pytest.approx(coverage, abs=0.005)


def test_a_bracket_row_bounds_the_ratio_between_its_two_batches() -> None:
    row = {"capacity_bytes": 24 * GIB, "peak_fits": 20 * GIB, "peak_fails": 26 * GIB}
    (seen,) = observations([row])
    assert seen.high == pytest.approx(math.log(24 / 20))
    assert seen.low == pytest.approx(math.log(24 / 26))
    reading = {"measured_used_mib": 1100.0, "sim_used_mib": 1000.0}
    (point,) = observations([reading])
    assert point.low == point.high == pytest.approx(math.log(1.1))
    # The plan reaches the failing batch once its peak there is under the limit.
    assert oom_rate([row], 0.0) == (0, 1)
    assert oom_rate([{**row, "peak_fails": 23 * GIB}], 0.0) == (1, 1)
    assert oom_rate([{**row, "peak_fails": 23 * GIB}], 0.05) == (0, 1)


def test_a_simulated_plan_states_its_risk_and_band() -> None:
    spec = {
        "model": {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
        "data": {"kind": "image", "channels": 3, "height": 64, "width": 64, "num_classes": 10},
        "training": {"optimizer": "sgd_momentum", "global_batch_size": 96},
        "device": {"kind": "simulated", "memory_gib": 2},
        "search": {"what_if": False, "micro_batch": "max"},
    }
    result = engine.plan(PlanSpec.model_validate(spec))
    risk, capacity = result.risk, result.device.memory_bytes
    assert risk is not None
    # What the search held against the limit: the reserve the step needs, plus the context.
    at_micro = next(t for t in result.trials if t.batch_size == result.micro_batch_size)
    assert risk.peak_fraction == pytest.approx(at_micro.peak_bytes / capacity)
    expected = PEAK_SPREAD.oom_probability(int(risk.peak_fraction * capacity), capacity)
    assert risk.oom_probability == pytest.approx(expected, rel=1e-3, abs=1e-9)
    assert risk.oom_probability <= risk.max_micro_batch_oom_probability
    assert risk.peak_fraction <= 1 - SearchSpec().headroom + 1e-9  # under the search's limit
    assert risk.max_micro_batch_oom_probability <= TARGET_OOM_RATE + 1e-9
    t = result.throughput
    assert t is not None and t.band_coverage == THROUGHPUT_SPREAD.coverage
    low, high = t.samples_per_second_band or (0, 0)
    assert low == pytest.approx(t.samples_per_second * THROUGHPUT_SPREAD.low)
    assert high == pytest.approx(t.samples_per_second * THROUGHPUT_SPREAD.high)


def test_the_simulated_peak_at_a_batch_is_its_probe_or_the_line_through_the_nearest_two() -> None:
    def probe(batch: int, peak: int, lower: bool = False) -> TrialOutcome:
        return TrialOutcome(batch, True, peak, 0.0, peak_is_lower_bound=lower)

    trials = [probe(8, 1000), probe(16, 1800), probe(64, 6000), probe(32, 9999, lower=True)]
    assert simulated_peak_at(trials, 16) == 1800
    assert simulated_peak_at(trials, 12) == pytest.approx(1400)  # between 8 and 16
    assert simulated_peak_at(trials, 40) == pytest.approx(1800 + 24 * 4200 / 48)  # 16 and 64
    assert simulated_peak_at(trials, 4) == pytest.approx(600)  # beyond: the nearest line
    assert simulated_peak_at([probe(8, 1000)], 9) is None


def test_grouped_readings_fit_as_their_points_do() -> None:
    """GET /v1/fidelity's count, mean and sd of ln(real / simulated) weigh as the readings."""
    rng = random.Random(11)
    points = [rng.gauss(-0.02, 0.03) for _ in range(40)]
    brackets = [Censored(low=x - 0.1, high=x + 0.1) for x in (0.0, 0.05, -0.04)]
    one_by_one = fit_log_normal([*brackets, *(Censored(low=x, high=x) for x in points)])
    mean = sum(points) / len(points)
    sd = math.sqrt(sum((x - mean) ** 2 for x in points) / len(points))
    grouped = fit_log_normal(brackets, [Readings(n=len(points), mean=mean, sd=sd)])
    assert grouped.mu == pytest.approx(one_by_one.mu, abs=1e-4)
    assert grouped.sigma == pytest.approx(one_by_one.sigma, rel=1e-3)


def test_a_row_s_plan_runs_out_of_memory_by_its_bracket_then_by_the_fit() -> None:
    """At or under the batch that ran: never; at or over the one that did not: always; between
    them: the normal conditioned on the row's own bracket."""
    row = {
        "capacity_bytes": 1000,
        "bracket": {"fits": 100, "fails": 200},
        "peak_fits": 600,
        "peak_fails": 1100,  # 5 bytes a sample: at headroom h, batch 100 + (1000(1-h) - 600) / 5
        "max_h0": 180,
    }
    spread = PeakSpread(mu=0.02, sigma=0.03)
    assert expected_oom_rate([row], spread, 0.45) == 0.0  # batch 90 < 100: it ran
    assert expected_oom_rate([{**row, "peak_fails": 950}], spread, 0.0) == 1.0  # 200 fits in sim
    chance = expected_oom_rate([row], spread, 0.1)  # batch 160, simulated peak 900
    dist = NormalDist(0.02, 0.03)
    ran, below = dist.cdf(math.log(1000 / 600)), dist.cdf(math.log(1000 / 1100))
    assert chance == pytest.approx((ran - dist.cdf(math.log(1000 / 900))) / (ran - below))
    assert 0 < chance < expected_oom_rate([row], spread, 0.05) < 1


def test_a_plan_can_ask_for_a_risk_instead_of_a_headroom() -> None:
    """search.max_oom_probability: the plan keeps the headroom that gives that chance at its
    largest micro-batch; the same job at the default headroom takes more of the card."""
    spec = {
        "model": {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
        "data": {"kind": "image", "channels": 3, "height": 64, "width": 64, "num_classes": 10},
        "training": {"optimizer": "sgd_momentum", "global_batch_size": 96},
        "device": {"kind": "simulated", "memory_gib": 2},
        "search": {"what_if": False, "micro_batch": "max", "max_oom_probability": 1e-4},
    }
    careful = engine.plan(PlanSpec.model_validate(spec))
    spec["search"].pop("max_oom_probability")
    default = engine.plan(PlanSpec.model_validate(spec))
    assert careful.risk is not None and default.risk is not None
    assert careful.risk.headroom == pytest.approx(PEAK_SPREAD.headroom_for(1e-4))
    assert careful.risk.headroom > default.risk.headroom == SearchSpec().headroom
    assert careful.risk.max_micro_batch_oom_probability <= 1e-4
    assert careful.max_micro_batch_size < default.max_micro_batch_size


def test_a_real_device_refuses_a_risk_target_at_its_field() -> None:
    spec = {
        "model": {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
        "data": {"kind": "image", "channels": 3, "height": 32, "width": 32, "num_classes": 10},
        "device": {"kind": "cpu", "memory_gib": 1},
        "search": {"max_oom_probability": 0.01},
    }
    with pytest.raises(SpecError) as refused:
        engine.check(PlanSpec.model_validate(spec))
    assert refused.value.loc == ("search", "max_oom_probability")


def test_the_risk_of_each_probed_micro_batch_rises_with_its_peak() -> None:
    spec = {
        "model": {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
        "data": {"kind": "image", "channels": 3, "height": 64, "width": 64, "num_classes": 10},
        "training": {"optimizer": "sgd_momentum", "global_batch_size": 96},
        "device": {"kind": "simulated", "memory_gib": 2},
        "search": {"what_if": False},
    }
    result = engine.plan(PlanSpec.model_validate(spec))
    assert result.risk is not None
    curve = [(p.micro_batch, p.oom_probability) for p in result.risk.by_micro_batch]
    own = ("search", "breakdown")  # this job's probes, not the what-ifs'
    probed = {t.batch_size: t.peak_bytes for t in result.trials if t.phase in own}
    assert [b for b, _ in curve] == sorted(probed)  # every batch the search probed, in order
    capacity = result.device.memory_bytes
    for batch, chance in curve:
        assert chance == pytest.approx(PEAK_SPREAD.oom_probability(probed[batch], capacity))
    assert [c for _, c in curve] == sorted(c for _, c in curve)  # more batch, more risk
    at = dict(curve)
    assert at[result.max_micro_batch_size] == pytest.approx(
        result.risk.max_micro_batch_oom_probability
    )
    over = [c for b, c in curve if b > result.max_micro_batch_size]
    assert over and min(over) > result.risk.max_micro_batch_oom_probability
