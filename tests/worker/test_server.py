"""Against real processes: a uvicorn server with its embedded worker, standalone workers on one
PostgreSQL, and a worker killed with SIGKILL mid-plan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from service.client import TrainplanClient
from service.schemas.spec import PlanSpec
from service.store import plans
from service.store.db import make_engine, make_session_factory, upgrade
from tests.helpers import free_port, registered_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(db_url: str, plugins: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        TRAINPLAN_DATABASE_URL=db_url,
        TRAINPLAN_HEARTBEAT_SECONDS="0.5",
        TRAINPLAN_POLL_SECONDS="0.1",
        **extra,
    )
    if plugins:
        env["PYTHONPATH"] = plugins + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _trainplan(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def _serving(db_url: str, **extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`trainplan serve` on a free port, once it answers /readyz."""
    port = free_port()
    proc = _trainplan("serve", "--port", str(port), env=_env(db_url, **extra))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode()[-3000:])  # type: ignore
            time.sleep(0.2)
        else:
            raise AssertionError("server did not become ready")
        yield url, proc
    finally:
        _stop(proc)


@pytest.fixture
def server(db_url: str) -> Iterator[str]:
    """`trainplan serve` (API + embedded worker) on each database."""
    with _serving(db_url) as (url, _):
        yield url


def _api_processes(parent: int) -> list[int]:
    """uvicorn's worker processes under `parent` (spawned by multiprocessing)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                cmdline = cmd.read()
        except OSError:
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def test_several_api_processes_share_one_embedded_worker(
    db_url: str, small_spec: dict[str, Any]
) -> None:
    """TRAINPLAN_API_WORKERS=2: two API processes, one migration, one embedded worker; every
    route answers from either process, streams included (each has its own change feed)."""
    with _serving(db_url, TRAINPLAN_API_WORKERS="2") as (url, proc):
        assert len(_api_processes(proc.pid)) == 2
        with TrainplanClient(url) as client:
            submitted = client.submit(small_spec)
            kinds = [kind for kind, _ in client.events(submitted["id"])]
            assert kinds[-1] == "end" and "trial" in kinds
            assert client.wait(submitted["id"], timeout=60)["status"] == "succeeded"
            workers = client.http.get("/v1/workers").json()["items"]
            assert len(workers) == 1 and workers[0]["plans_done"] == 1


def test_whole_life_of_a_plan_over_http(server: str, small_spec: dict[str, Any]) -> None:
    with TrainplanClient(server) as client:
        submitted = client.submit(small_spec)
        events = list(client.events(submitted["id"]))
        kinds = [k for k, _ in events]
        assert kinds[-1] == "end" and events[-1][1]["status"] == "succeeded"
        trials = [d for k, d in events if k == "trial"]
        plan = client.wait(submitted["id"], timeout=60)
        assert plan["status"] == "succeeded"
        result = plan["result"]
        assert [(t["batch_size"], t["fits"]) for t in trials] == [
            (t["batch_size"], t["fits"]) for t in result["trials"]
        ]
        # resubmitting the same spec returns the stored plan
        again = client.submit(small_spec)
        assert again["id"] == submitted["id"] and again["status"] == "succeeded"
        workers = client.http.get("/v1/workers").json()["items"]
        assert workers and workers[0]["plans_done"] >= 1
        metrics = client.http.get("/metrics").text
        assert 'trainplan_plans{status="succeeded"} 1' in metrics


def test_cli_follows_a_plan_on_the_server(
    server: str, small_spec: dict[str, Any], tmp_path: Any
) -> None:
    import json

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(small_spec | {"refresh": True}))
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "plan", str(spec_file), "--server", server, "--json"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    body = json.loads(out.stdout)
    assert body["status"] == "succeeded" and body["result"]["max_micro_batch_size"] > 0


def _pg_only(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("many workers share PostgreSQL; SQLite is the embedded single-worker store")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_workers_on_postgres_run_each_plan_exactly_once(
    db_url: str, plugins: str, workers: int
) -> None:
    _pg_only(db_url)
    upgrade(db_url)
    factory = make_session_factory(make_engine(db_url))
    ids = []
    with factory() as s:
        for i in range(200):
            spec = registered_spec("test-mlp", hidden=8 + i)
            spec["search"] = {"max_batch_size": 2}
            parsed = PlanSpec.model_validate(spec)
            ids.append(plans.create_plan(s, spec=parsed.canonical(), spec_hash=parsed.spec_hash).id)
        s.commit()
    procs = [_trainplan("worker", env=_env(db_url, plugins)) for _ in range(workers)]
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            with factory() as s:
                depth = plans.queue_depth(s)
            if depth.get("succeeded", 0) + depth.get("failed", 0) == 200:
                break
            time.sleep(1)
    finally:
        for p in procs:
            _stop(p)
    with factory() as s:
        rows = [plans.get_plan(s, plan_id=i) for i in ids]
        errors = [p.error for p in rows if p is not None and p.status == "failed"][:3]
        assert all(p is not None and p.status == "succeeded" for p in rows), (
            plans.queue_depth(s),
            errors,
        )
        assert all(p.attempts == 1 for p in rows if p is not None)  # none ran twice
        assert len({p.worker_id for p in rows if p is not None}) == workers  # all took part


@pytest.mark.slow
def test_worker_killed_mid_plan_is_finished_by_another(db_url: str, plugins: str) -> None:
    _pg_only(db_url)
    upgrade(db_url)
    factory = make_session_factory(make_engine(db_url))
    parsed = PlanSpec.model_validate(registered_spec("test-slow", seconds=3))
    with factory() as s:
        plan_id = plans.create_plan(s, spec=parsed.canonical(), spec_hash=parsed.spec_hash).id
        s.commit()
    env = _env(db_url, plugins, TRAINPLAN_LEASE_SECONDS="2")
    first = _trainplan("worker", env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with factory() as s:
                plan = plans.get_plan(s, plan_id=plan_id)
            if plan is not None and plan.status == "running":
                break
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        second = _trainplan("worker", env=env)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                with factory() as s:
                    plan = plans.get_plan(s, plan_id=plan_id)
                if plan is not None and plan.status in ("succeeded", "failed"):
                    break
                time.sleep(0.2)
        finally:
            _stop(second)
    finally:
        _stop(first)
    assert plan is not None and plan.status == "succeeded", plan.error if plan else None
    assert plan.attempts == 2
