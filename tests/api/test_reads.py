"""Reads at scale (issue 14): a finished plan is served from its stored serialised form, the list
reads only its columns, and a plan carries the versions its worker ran it with."""

from __future__ import annotations

import json
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import text, update

from service.config import Settings
from service.feed.plan_views import body_schema, plan_out
from service.store import plans
from service.store.db import make_engine, make_session_factory, normalise_url, upgrade
from service.store.models import Plan
from workers import engine
from workers.loop import PlanWorker


def _finished(client: TestClient, spec: dict[str, Any]) -> str:
    """Submit and run the plan to its end with a worker on the client's store."""
    plan_id = client.post("/v1/plans", json=spec).json()["id"]
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    settings = Settings(database_url="sqlite://", heartbeat_seconds=0.5)
    assert PlanWorker(settings, factory, "w-reads").run_once() == 1
    return str(plan_id)


def _row(client: TestClient, plan_id: str) -> Plan:
    with client.app.state.session_factory() as s:  # type: ignore[attr-defined]
        plan = plans.get_plan(s, plan_id=plan_id)
        assert plan is not None
        return plan


def _set(client: TestClient, plan_id: str, **values: Any) -> None:
    with client.app.state.session_factory() as s:  # type: ignore[attr-defined]
        s.execute(update(Plan).where(Plan.id == plan_id).values(**values))
        s.commit()


def test_a_finished_plan_is_served_from_its_stored_form(
    client: TestClient, small_spec: dict[str, Any]
) -> None:
    plan_id = _finished(client, small_spec)
    assert _row(client, plan_id).body is None  # rendered by the first read, not before
    first = client.get(f"/v1/plans/{plan_id}")
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    row = _row(client, plan_id)
    assert row.body is not None and row.body_schema == body_schema()
    # the stored form is the same document the model view renders
    with client.app.state.session_factory() as s:  # type: ignore[attr-defined]
        view = plan_out(plans.get_plan(s, plan_id=plan_id), s)  # type: ignore[arg-type]
    assert first.json() == json.loads(view.model_dump_json())
    assert first.json()["result"]["max_micro_batch_size"] > 0

    # later reads send the stored bytes as they are ...
    _set(client, plan_id, body=json.dumps({"stored": True}))
    assert client.get(f"/v1/plans/{plan_id}").json() == {"stored": True}
    assert client.post("/v1/plans", json=small_spec).json() == {"stored": True}
    # ... until the response's shape changes: a body of another schema is rendered again
    _set(client, plan_id, body_schema="0" * 16)
    again = client.get(f"/v1/plans/{plan_id}").json()
    assert again == first.json()
    assert _row(client, plan_id).body_schema == body_schema()


def test_a_running_plan_is_rendered_and_not_stored(
    client: TestClient, small_spec: dict[str, Any]
) -> None:
    plan_id = client.post("/v1/plans", json=small_spec).json()["id"]
    for _ in range(2):
        assert client.get(f"/v1/plans/{plan_id}").json()["status"] == "queued"
    assert _row(client, plan_id).body is None


def test_the_list_reads_the_answer_from_its_column(
    client: TestClient, small_spec: dict[str, Any]
) -> None:
    plan_id = _finished(client, small_spec)
    queued = client.post("/v1/plans", json=small_spec | {"refresh": True}).json()["id"]
    items = {p["id"]: p for p in client.get("/v1/plans").json()["items"]}
    answer = _row(client, plan_id).result["max_micro_batch_size"]  # type: ignore[index]
    assert items[plan_id]["max_micro_batch_size"] == answer > 0
    assert items[queued]["max_micro_batch_size"] is None
    assert set(items[plan_id]) == {
        "id",
        "status",
        "created_at",
        "finished_at",
        "model",
        "spec_hash",
        "max_micro_batch_size",
    }


def test_the_worker_stamps_the_versions_it_ran_with(
    client: TestClient, small_spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a rolling upgrade the API that queued a plan and the worker that ran it differ: the
    plan shows the worker's versions and is reused under their key."""
    newer = engine.versions() | {"engine": "9.9.9+r99"}
    monkeypatch.setattr(engine, "versions", lambda: newer)
    plan_id = client.post("/v1/plans", json=small_spec).json()["id"]
    monkeypatch.undo()
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    assert PlanWorker(Settings(), factory, "w-old").run_once() == 1
    row = _row(client, plan_id)
    assert row.versions == engine.versions()
    assert row.reuse_key == plans.reuse_key(row.spec_hash, engine.versions())
    # so this server, whose versions match the worker's, reuses it
    again = client.post("/v1/plans", json=small_spec)
    assert again.status_code == 200 and again.json()["id"] == plan_id


def test_migration_0005_copies_the_answer_out_of_stored_results(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    config = Config("alembic.ini")
    config.set_main_option("script_location", "migrations")
    config.set_main_option("sqlalchemy.url", normalise_url(url))
    command.upgrade(config, "0004")
    old = make_engine(url)
    with old.begin() as conn:
        for plan_id, seq, result in (("a", 1, {"max_micro_batch_size": 37}), ("b", 2, None)):
            conn.execute(
                text(
                    "INSERT INTO plans (id, seq, status, spec, spec_hash, model_name, "
                    "device_kind, created_at, updated_at, attempts, cancel_requested, result) "
                    "VALUES (:id, :seq, 'succeeded', '{}', 'h', 'm', 'simulated', "
                    "'2026-01-01', '2026-01-01', 1, 0, :result)"
                ),
                {"id": plan_id, "seq": seq, "result": json.dumps(result) if result else None},
            )
    old.dispose()
    upgrade(url)
    with make_session_factory(make_engine(url))() as s:
        a, b = (plans.get_plan(s, plan_id=i) for i in ("a", "b"))
        assert a is not None and a.max_micro_batch_size == 37 and a.body is None
        assert b is not None and b.max_micro_batch_size is None
