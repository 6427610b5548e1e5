"""Faults: the database goes away mid-plan, the SQLite disk fills up, a spec would trace for
minutes. Each recovers, or fails that one plan with a clear error; no plan is lost or run twice.
(Worker SIGKILL mid-plan is in tests/worker/test_server.py; the time limit in
tests/worker/test_worker.py.)"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog.testing
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

from service.api.app import create_app
from service.config import Settings
from service.store import plans
from service.store.db import make_engine, make_session_factory, upgrade
from tests.helpers import enqueue, registered_spec
from workers.loop import PlanWorker


class TcpProxy:
    """A loopback TCP proxy that can drop every connection and refuse new ones: to a client this
    is exactly a database server restarting."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """The server goes down: every open connection breaks, new ones are refused."""
        self.down.set()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.sockets.clear()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def pg_url(db_url: str) -> str:
    if not db_url.startswith("postgresql"):
        pytest.skip("a TCP outage needs a networked database")
    return db_url


def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_database_restart_mid_plan_costs_a_pause_not_the_plan(
    pg_url: str, plugins: str, small_spec: dict[str, Any]
) -> None:
    upgrade(pg_url)
    direct = make_session_factory(make_engine(pg_url))
    url = make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = Settings(
        database_url=proxied, heartbeat_seconds=0.3, poll_seconds=0.1, lease_seconds=30
    )
    worker = PlanWorker(settings, make_session_factory(make_engine(proxied)), "w-outage")
    first = enqueue(direct, small_spec)  # warms the worker's process pool before the outage
    slow = enqueue(direct, registered_spec("test-slow", seconds=2))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop, 2), daemon=True)
    try:
        with structlog.testing.capture_logs() as logs:
            thread.start()
            _wait_for(lambda: plans.get_plan(direct(), plan_id=slow).status == "running")
            time.sleep(0.3)
            proxy.cut()  # the database "restarts" while the plan builds: heartbeats fail
            time.sleep(3.0)
            proxy.restore()
            thread.join(timeout=120)
        assert not thread.is_alive()
    finally:
        stop.set()
        proxy.close()
    retries = [e for e in logs if e["event"] == "worker.store_retry"]
    assert retries, "the outage never reached the worker"
    assert not [e for e in logs if e["event"] == "worker.loop_error"]
    with direct() as s:
        for plan_id in (first, slow):
            plan = plans.get_plan(s, plan_id=plan_id, with_trials=True)
            assert plan.status == "succeeded", plan.error
            assert plan.attempts == 1  # waited out, not re-run
            indexes = [t.index for t in plan.trial_rows]
            assert indexes == list(range(len(indexes)))  # every trial once, in order
            assert len(plan.trial_rows) == len(plan.result["trials"])


@pytest.fixture
def capped_sqlite(tmp_path: Any) -> Iterator[tuple[str, dict[str, int]]]:
    """A SQLite store whose file may not grow past `cap["pages"]`: SQLite's own
    'database or disk is full', the error a full disk gives, on demand."""
    url = f"sqlite:///{tmp_path}/full.db"
    upgrade(url)
    # The migrations' table rebuilds leave free pages inside the file, where new rows would fit
    # without growing it: compact it, so a cap at its size means no room at all.
    engine = make_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("VACUUM")
    engine.dispose()
    cap = {"pages": 1 << 30}

    def limit(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {cap['pages']}")

    event.listen(Engine, "connect", limit)
    try:
        yield url, cap
    finally:
        event.remove(Engine, "connect", limit)


def _page_count(url: str) -> int:
    with make_engine(url).connect() as conn:
        return int(conn.exec_driver_sql("PRAGMA page_count").scalar() or 0)


def test_full_disk_is_a_503_that_changes_nothing(
    capped_sqlite: tuple[str, dict[str, int]], small_spec: dict[str, Any]
) -> None:
    url, cap = capped_sqlite
    cap["pages"] = _page_count(url) + 4
    settings = Settings(database_url=url, embedded_worker=False)
    accepted, refused = [], None
    with TestClient(create_app(settings, migrate=False)) as client:
        for epochs in range(1, 200):
            spec = small_spec | {"training": {**small_spec["training"], "epochs": epochs}}
            response = client.post("/v1/plans", json=spec)
            if response.status_code != 202:
                refused = response
                break
            accepted.append(response.json()["id"])
        assert refused is not None, "the store never filled up"
        assert refused.status_code == 503
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.headers["retry-after"] == "5"
        body = refused.json()
        assert body["type"].endswith("store-unavailable") and "full" in body["detail"]
        # reads still work, and the refused plan left nothing behind
        listed = client.get("/v1/plans", params={"limit": 200}).json()
        assert sorted(p["id"] for p in listed["items"]) == sorted(accepted)
        assert client.get("/healthz").status_code == 200


def test_full_disk_while_a_worker_finishes_recovers_once_space_returns(
    capped_sqlite: tuple[str, dict[str, int]], small_spec: dict[str, Any]
) -> None:
    """The result cannot be written: the worker waits out its lease, then gives the plan up; it
    stays claimed (not lost, not failed), and once space returns it is claimed again and recorded
    once."""
    url, cap = capped_sqlite
    settings = Settings(database_url=url, heartbeat_seconds=0.3, poll_seconds=0.1, lease_seconds=2)
    factory = make_session_factory(make_engine(url))
    plan_id = enqueue(factory, small_spec)
    cap["pages"] = _page_count(url)  # the file may not grow: new rows and the result do not fit
    full = PlanWorker(settings, make_session_factory(make_engine(url)), "w-full")
    with pytest.raises(Exception, match="full"):
        full.run_once()
    with factory() as s:
        plan = plans.get_plan(s, plan_id=plan_id)
        assert plan.status == "running" and plan.result is None and plan.attempts == 1
    cap["pages"] = 1 << 30  # space is back (for new connections)
    time.sleep(settings.lease_seconds)  # the lost lease runs out
    fresh = PlanWorker(settings, make_session_factory(make_engine(url)), "w-fresh")
    assert fresh.run_once() == 1
    with factory() as s:
        plan = plans.get_plan(s, plan_id=plan_id, with_trials=True)
    assert plan.status == "succeeded" and plan.attempts == 2 and plan.worker_id == "w-fresh"
    latest = [t for t in plan.trial_rows if t.attempt == 2]
    assert len(latest) == len(plan.result["trials"])


def test_a_spec_that_would_trace_for_minutes_fails_that_plan_only(
    db_url: str, small_spec: dict[str, Any]
) -> None:
    """An 80-billion-parameter, 400-layer decoder at 4096 tokens: it builds on meta at once (so it
    is accepted), but each probe would trace for minutes. The time limit stops it alone."""
    upgrade(db_url)
    factory = make_session_factory(make_engine(db_url))
    huge = {
        "model": {
            "source": "transformers",
            "architecture": "LlamaForCausalLM",
            "config": {
                "num_hidden_layers": 400,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 32000,
                "max_position_embeddings": 4096,
            },
        },
        "data": {"kind": "tokens", "seq_len": 4096, "num_samples": 1000},
        "training": {"optimizer": "adamw", "precision": "bf16"},
        "device": {"kind": "simulated", "gpu": "H200"},
        "search": {"what_if": False},
    }
    slow_id = enqueue(factory, huge)
    next_id = enqueue(factory, small_spec)
    settings = Settings(
        database_url=db_url, heartbeat_seconds=0.5, poll_seconds=0.1, plan_timeout_seconds=4.0
    )
    worker = PlanWorker(settings, factory, "w-huge")
    started = time.monotonic()
    assert worker.run_once() == 1
    assert time.monotonic() - started < 60
    assert worker.run_once() == 1
    with factory() as s:
        slow, after = plans.get_plan(s, plan_id=slow_id), plans.get_plan(s, plan_id=next_id)
    assert slow.status == "failed" and slow.error["status"] == 504
    assert "time limit" in slow.error["title"] and slow.attempts == 1
    assert after.status == "succeeded"
