"""Real devices are seeded by their simulated twin; the store keeps prediction beside truth."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.schemas.spec import PlanSpec
from service.store import claims, plans
from service.store.db import make_engine, make_session_factory
from tests.helpers import a_result, mlp_spec, probe_fresh
from workers import engine
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device, open_session, twin_of
from workers.engine.search import find_max_batch


def cpu_spec(seed: bool = True, optimizer: str = "sgd_momentum") -> dict[str, Any]:
    spec = mlp_spec(optimizer)
    spec["device"] = {"kind": "cpu", "memory_gib": 0.05}
    spec["search"] = {**spec["search"], "seed_from_simulation": seed}
    return spec


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_a_cpu_plan_confirms_its_twins_answer_in_two_real_trials(optimizer: str) -> None:
    spec = PlanSpec.model_validate(cpu_spec(optimizer=optimizer))
    result = engine.plan(spec)
    answer = result.max_micro_batch_size
    search = [t for t in result.trials if t.phase == "search"]
    assert [(t.batch_size, t.fits) for t in search] == [(answer, True), (answer + 1, False)]
    checks = probe_fresh(spec, [answer, answer + 1])  # real CPU steps, independent of the plan
    assert checks == {answer: True, answer + 1: False}
    p = result.prediction
    assert p is not None and p.real_max_micro_batch_size == answer
    assert p.relative_error == (p.predicted_max_micro_batch_size - answer) / answer
    assert p.simulated_trials >= 2
    # The real peak at the answer over the twin's there (probed apart, in a fresh session).
    real_peak = next(t.peak_bytes for t in search if t.batch_size == answer)
    job = compile_job(spec)
    twin = twin_of(open_device(job))
    assert twin is not None
    with open_session(twin, job) as session:
        simulated_peak = session.probe(answer).peak_bytes
    assert p.peak_ratio == pytest.approx(real_peak / simulated_peak, rel=0.02)


def test_seeding_changes_the_trials_not_the_answer() -> None:
    seeded = engine.plan(PlanSpec.model_validate(cpu_spec(seed=True)))
    blind = engine.plan(PlanSpec.model_validate(cpu_spec(seed=False)))
    assert seeded.max_micro_batch_size == blind.max_micro_batch_size
    assert blind.prediction is None
    search = [t for t in blind.trials if t.phase == "search"]
    assert len(search) > 2 >= len([t for t in seeded.trials if t.phase == "search"])


def test_a_wrong_seed_falls_back_to_an_exact_search() -> None:
    spec = PlanSpec.model_validate(cpu_spec(seed=False))
    device = open_device(compile_job(spec))

    for seed in (1, 7, 100_000):
        with open_session(device, compile_job(spec)) as session:
            seeded = find_max_batch(session.probe, session.limit_bytes, 1 << 20, seed=seed)
        with open_session(device, compile_job(spec)) as session:
            blind = find_max_batch(session.probe, session.limit_bytes, 1 << 20)
        assert seeded.max_batch == blind.max_batch


def test_twins() -> None:
    cpu = open_device(compile_job(PlanSpec.model_validate(cpu_spec())))
    twin = twin_of(cpu)
    assert twin is not None and twin.backend == "simulated" and twin.overhead_bytes == 0
    assert twin.memory_bytes == cpu.memory_bytes
    simulated = open_device(compile_job(PlanSpec.model_validate(mlp_spec("adam"))))
    assert twin_of(simulated) is None


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    settings = Settings(database_url=db_url, embedded_worker=False)
    with TestClient(create_app(settings)) as c:
        yield c


def _finish(
    db_url: str, spec: dict[str, Any], predicted: int, real: int, ratio: float | None = None
) -> None:
    factory = make_session_factory(make_engine(db_url))
    parsed = PlanSpec.model_validate(spec)
    with factory() as s:
        plans.create_plan(s, spec=parsed.canonical(), spec_hash=parsed.spec_hash)
        s.commit()
        plan = claims.claim_next(s, worker_id="w", lease_seconds=30, device_kinds=("cpu",))
        assert plan is not None
        result = {
            "device": {"backend": "cpu", "name": "cpu-budget-0.05GiB", "memory_bytes": 1},
            "prediction": {
                "predicted_max_micro_batch_size": predicted,
                "real_max_micro_batch_size": real,
                "relative_error": (predicted - real) / real,
                "peak_ratio": ratio,
                "simulated_trials": 4,
                "simulated_wall_s": 0.5,
            },
        }
        assert claims.finish(
            s, plan_id=plan.id, worker_id="w", status="succeeded", result=a_result(**result)
        )


def test_fidelity_aggregates_predictions_by_model_and_device(
    client: TestClient, db_url: str
) -> None:
    assert client.get("/v1/fidelity").json() == {"items": []}
    _finish(db_url, cpu_spec() | {"training": {"epochs": 1}}, predicted=110, real=100, ratio=1.1)
    _finish(db_url, cpu_spec() | {"training": {"epochs": 2}}, predicted=95, real=100, ratio=0.9)
    _finish(db_url, cpu_spec() | {"training": {"epochs": 3}}, predicted=100, real=100)
    body = client.get("/v1/fidelity")
    assert body.status_code == 200
    (row,) = body.json()["items"]
    assert row["device_kind"] == "cpu" and row["device"] == "cpu-budget-0.05GiB"
    assert row["plans"] == 3 and row["over_predicted"] == 1
    assert row["mean_abs_relative_error"] == pytest.approx(0.05)
    assert row["max_abs_relative_error"] == pytest.approx(0.10)
    # ln(real / simulated peak) over the two plans that knew both peaks
    assert row["peak_ratio_plans"] == 2
    assert row["log_peak_ratio_mean"] == pytest.approx((math.log(1.1) + math.log(0.9)) / 2)
    assert row["log_peak_ratio_sd"] == pytest.approx((math.log(1.1) - math.log(0.9)) / 2)
