"""The worker runs plans in child processes: results, trials, cancel, time limit, crashes."""

from __future__ import annotations

import threading
import time
from typing import Any

from service.config import Settings
from service.store import plans, registry
from service.store.db import make_engine, make_session_factory, upgrade
from tests.helpers import enqueue, registered_spec
from workers.loop import PlanWorker


def _setup(db_url: str, **overrides: Any) -> tuple[Settings, Any]:
    settings = Settings(database_url=db_url, heartbeat_seconds=0.5, poll_seconds=0.1, **overrides)
    upgrade(db_url)
    return settings, make_session_factory(make_engine(db_url))


def _plan(factory: Any, plan_id: str) -> Any:
    with factory() as s:
        return plans.get_plan(s, plan_id=plan_id, with_trials=True)


def test_worker_runs_a_plan_and_records_every_trial(
    db_url: str, small_spec: dict[str, Any]
) -> None:
    settings, factory = _setup(db_url)
    plan_id = enqueue(factory, small_spec)
    worker = PlanWorker(settings, factory, "w-test")
    assert worker.run_once() == 1
    plan = _plan(factory, plan_id)
    assert plan.status == "succeeded", plan.error
    result = plan.result
    assert result["max_micro_batch_size"] > 0
    stored = [(t.batch_size, t.fits) for t in plan.trial_rows]
    assert stored == [(t["batch_size"], t["fits"]) for t in result["trials"]]
    assert plan.finished_at is not None and plan.worker_id == "w-test"


def test_registered_model_plans(db_url: str, plugins: str) -> None:
    settings, factory = _setup(db_url)
    plan_id = enqueue(factory, registered_spec("test-mlp", hidden=128))
    PlanWorker(settings, factory).run_once()
    plan = _plan(factory, plan_id)
    assert plan.status == "succeeded", plan.error
    assert plan.result["model_summary"]["parameters"] == 64 * 128 + 128 + 128 * 10 + 10


def test_a_crashing_plan_costs_that_plan_only(db_url: str, plugins: str) -> None:
    settings, factory = _setup(db_url)
    crash_id = enqueue(factory, registered_spec("test-crash"))
    ok_id = enqueue(factory, registered_spec("test-mlp"))
    worker = PlanWorker(settings, factory)
    assert worker.run_once() == 1 and worker.run_once() == 1
    crashed = _plan(factory, crash_id)
    assert crashed.status == "failed" and "137" in crashed.error["detail"]
    assert _plan(factory, ok_id).status == "succeeded"


def test_time_limit_fails_the_plan(db_url: str, plugins: str) -> None:
    settings, factory = _setup(db_url, plan_timeout_seconds=2.0)
    plan_id = enqueue(factory, registered_spec("test-slow", seconds=60))
    start = time.monotonic()
    PlanWorker(settings, factory).run_once()
    assert time.monotonic() - start < 30
    plan = _plan(factory, plan_id)
    assert plan.status == "failed" and plan.error["type"].endswith("plan-timeout")


def test_unknown_registered_model_fails_with_422_problem(db_url: str, plugins: str) -> None:
    settings, factory = _setup(db_url)
    plan_id = enqueue(factory, registered_spec("no-such-model"))
    PlanWorker(settings, factory).run_once()
    plan = _plan(factory, plan_id)
    assert plan.status == "failed" and plan.error["status"] == 422
    assert "test-mlp" in plan.error["detail"]


def test_cancel_stops_a_running_plan(db_url: str, plugins: str) -> None:
    settings, factory = _setup(db_url)
    plan_id = enqueue(factory, registered_spec("test-slow", seconds=4))
    worker = PlanWorker(settings, factory)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    deadline = time.monotonic() + 20
    while _plan(factory, plan_id).status != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    with factory() as s:
        plans.request_cancel(s, plan_id=plan_id)
        s.commit()
    thread.join(timeout=60)
    plan = _plan(factory, plan_id)
    assert plan.status == "cancelled"
    assert plan.result is None


def test_a_busy_worker_keeps_its_heartbeat(db_url: str, plugins: str) -> None:
    """While a plan runs, the worker's own heartbeat advances (it used to beat only when idle,
    so GET /v1/workers showed a busy worker as lost)."""
    settings, factory = _setup(db_url)
    plan_id = enqueue(factory, registered_spec("test-slow", seconds=4))
    worker = PlanWorker(settings, factory, "w-busy")
    thread = threading.Thread(target=worker.run, args=(threading.Event(), 1))
    thread.start()

    def beat() -> Any:
        with factory() as s:
            rows = [w for w in registry.list_workers(s) if w.id == "w-busy"]
            return (rows[0].heartbeat_at, rows[0].current_plan_id) if rows else (None, None)

    # the claim marks the plan running a moment before the worker's row names it (seen on
    # PostgreSQL under load): wait for both
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        _plan(factory, plan_id).status != "running" or beat()[1] != plan_id
    ):
        time.sleep(0.05)
    first, current = beat()
    time.sleep(2.0)  # four heartbeat periods
    later, still = beat()
    thread.join(timeout=60)
    assert current == still == plan_id
    assert later > first


def test_a_plan_over_its_memory_limit_fails_and_the_worker_goes_on(
    db_url: str, plugins: str
) -> None:
    """A runaway spec grows its process until the cap (here 1 GiB) refuses an allocation: that
    plan fails with a 'plan-memory-limit' problem, the next plan runs."""
    settings, factory = _setup(db_url, plan_memory_limit_gib=1.0)
    hog_id = enqueue(factory, registered_spec("test-hog", gib=3.0))
    ok_id = enqueue(factory, registered_spec("test-mlp"))
    worker = PlanWorker(settings, factory)
    assert worker.run_once() == 1 and worker.run_once() == 1
    hog = _plan(factory, hog_id)
    assert hog.status == "failed" and hog.error["type"].endswith("plan-memory-limit"), hog.error
    assert "1 GiB" in hog.error["detail"] and hog.error["status"] == 422
    assert _plan(factory, ok_id).status == "succeeded"
