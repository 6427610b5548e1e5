"""The HTTP API in process (no worker): contract, problem details, dedupe, limits."""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.api.app import create_app
from service.config import Settings
from service.schemas.examples import RESNET50_A100
from service.store.models import Plan


def _problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    return body


def test_submit_get_and_dedupe(client: TestClient, small_spec: dict[str, Any]) -> None:
    r = client.post("/v1/plans", json=small_spec)
    assert r.status_code == 202, r.text
    plan = r.json()
    assert r.headers["location"] == f"/v1/plans/{plan['id']}"
    assert plan["status"] == "queued" and len(plan["spec_hash"]) == 64
    got = client.get(f"/v1/plans/{plan['id']}").json()
    assert got["id"] == plan["id"] and got["spec"] == plan["spec"]
    again = client.post("/v1/plans", json=small_spec)
    assert again.status_code == 200 and again.json()["id"] == plan["id"]
    fresh = client.post("/v1/plans", json=small_spec | {"refresh": True})
    assert fresh.status_code == 202 and fresh.json()["id"] != plan["id"]


def test_a_plan_of_an_older_engine_is_not_reused(
    client: TestClient, small_spec: dict[str, Any]
) -> None:
    """Reuse is keyed by the spec and the versions it was made with: after an upgrade of the
    engine, torch or the catalogue, a submit makes a new plan; the old one stays readable."""
    from workers import engine

    first = client.post("/v1/plans", json=small_spec).json()
    assert first["versions"] == engine.versions()
    assert set(first["versions"]) == {"engine", "torch", "catalogue"}
    # the stored plan as an older engine would have left it
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as s:
        s.execute(
            update(Plan)
            .where(Plan.id == first["id"])
            .values(versions={"engine": "0.0.1+r1"}, reuse_key="0" * 64)
        )
        s.commit()
    second = client.post("/v1/plans", json=small_spec)
    assert second.status_code == 202 and second.json()["id"] != first["id"]
    assert second.json()["spec_hash"] == first["spec_hash"]
    old = client.get(f"/v1/plans/{first['id']}").json()
    assert old["versions"] == {"engine": "0.0.1+r1"}
    assert client.post("/v1/plans", json=small_spec).json()["id"] == second.json()["id"]


def test_idempotency_key(client: TestClient, small_spec: dict[str, Any]) -> None:
    headers = {"Idempotency-Key": "abc-123"}
    first = client.post("/v1/plans", json=small_spec | {"refresh": True}, headers=headers)
    second = client.post("/v1/plans", json=small_spec | {"refresh": True}, headers=headers)
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]


def _five_channels(spec: dict[str, Any]) -> None:
    spec["data"]["channels"] = 5


def _unknown_optimizer(spec: dict[str, Any]) -> None:
    spec["training"]["optimizer"] = "lamb"


def _unknown_layer_type(spec: dict[str, Any]) -> None:
    spec["model"]["layers"][0] = {"type": "Exec"}


def _linear_of_the_wrong_width(spec: dict[str, Any]) -> None:
    spec["model"]["layers"].insert(8, {"type": "Linear", "in_features": 3, "out_features": 4})


def _unknown_gpu(spec: dict[str, Any]) -> None:
    spec["device"] = {"kind": "simulated", "gpu": "nope"}


def _headroom_over_one(spec: dict[str, Any]) -> None:
    spec["search"]["headroom"] = 2


def _tf32_on_a_t4(spec: dict[str, Any]) -> None:
    spec["device"] = {"kind": "simulated", "gpu": "T4"}
    spec["training"]["precision"] = "tf32"


def _split_size_under_the_minimum(spec: dict[str, Any]) -> None:
    spec["device"]["allocator"] = {"max_split_size_mb": 5}


def _roundup_divisions_not_a_power_of_two(spec: dict[str, Any]) -> None:
    spec["device"]["allocator"] = {"roundup_power2_divisions": 3}


def _unknown_torch_release(spec: dict[str, Any]) -> None:
    spec["device"]["runtime"] = {"torch": "latest"}


def _tensor_parallel_not_dividing_the_world(spec: dict[str, Any]) -> None:
    spec["training"]["world_size"] = 4
    spec["training"]["parallelism"] = {"strategy": "fsdp", "tensor_parallel": 3}


def _context_parallel_not_dividing_the_world(spec: dict[str, Any]) -> None:
    spec["training"]["world_size"] = 4
    spec["training"]["parallelism"] = {"strategy": "fsdp", "context_parallel": 3}


def _a_risk_of_one_half(spec: dict[str, Any]) -> None:
    spec.setdefault("search", {})["max_oom_probability"] = 0.5


def _a_risk_target_on_a_real_device(spec: dict[str, Any]) -> None:
    spec["device"] = {"kind": "cpu", "memory_gib": 1}
    spec.setdefault("search", {})["max_oom_probability"] = 0.01


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_five_channels, "data.channels"),
        (_unknown_optimizer, "training.optimizer"),
        (_unknown_layer_type, "model.layers.0.type"),
        (_linear_of_the_wrong_width, "model.layers.8"),
        (_unknown_gpu, "device.gpu"),
        (_headroom_over_one, "search.headroom"),
        (_tf32_on_a_t4, "training.precision"),
        (_split_size_under_the_minimum, "device.allocator.max_split_size_mb"),
        (
            _roundup_divisions_not_a_power_of_two,
            "device.allocator.roundup_power2_divisions",
        ),
        (_unknown_torch_release, "device.runtime.torch"),
        (_a_risk_of_one_half, "search.max_oom_probability"),
        # a validator across fields names the one at fault, not the object around it
        (_tensor_parallel_not_dividing_the_world, "training.parallelism.tensor_parallel"),
        (_context_parallel_not_dividing_the_world, "training.parallelism.context_parallel"),
        (_a_risk_target_on_a_real_device, "search.max_oom_probability"),
    ],
    ids=lambda case: case.__name__.strip("_") if callable(case) else None,
)
def test_invalid_specs_are_422_naming_the_field(
    client: TestClient,
    small_spec: dict[str, Any],
    mutate: Callable[[dict[str, Any]], None],
    field: str,
) -> None:
    spec = deepcopy(small_spec)
    mutate(spec)
    body = _problem(client.post("/v1/plans", json=spec), 422)
    fields = [e["field"] for e in body["errors"]]
    # the path in the document sent: no union member's tag (`data.image.channels`)
    assert field in fields, fields
    assert field.split(".")[0] in body["detail"]
    assert client.get("/v1/plans").json()["items"] == []  # nothing half-stored


def test_torchvision_kwargs_rejected_by_the_factory(client: TestClient) -> None:
    spec = deepcopy(RESNET50_A100)
    spec["model"]["kwargs"] = {"no_such_arg": 1}
    body = _problem(client.post("/v1/plans", json=spec), 422)
    assert body["errors"][0]["field"] == "model.kwargs"


def test_malformed_json_and_wrong_types(client: TestClient) -> None:
    _problem(
        client.post(
            "/v1/plans", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,  # not JSON: the line and column, not a field (tests/api/test_bad_input.py)
    )
    _problem(client.post("/v1/plans", json=[1, 2, 3]), 422)
    _problem(client.post("/v1/plans", json={"model": "resnet"}), 422)


def test_body_size_is_bounded(client: TestClient, small_spec: dict[str, Any]) -> None:
    spec = deepcopy(small_spec)
    spec["padding"] = "x" * (70 * 1024)
    _problem(client.post("/v1/plans", json=spec), 413)


def test_not_found_and_cancel(client: TestClient, small_spec: dict[str, Any]) -> None:
    _problem(client.get("/v1/plans/does-not-exist"), 404)
    _problem(client.post("/v1/plans/does-not-exist/cancel"), 404)
    _problem(client.get("/v1/plans/does-not-exist/events"), 404)
    plan = client.post("/v1/plans", json=small_spec).json()
    cancelled = client.post(f"/v1/plans/{plan['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    # a cancelled plan is not returned for the same spec: a new one is queued
    assert client.post("/v1/plans", json=small_spec).status_code == 202


def test_list_filters_and_cursor(client: TestClient, small_spec: dict[str, Any]) -> None:
    ids = []
    for epochs in range(1, 6):
        spec = deepcopy(small_spec)
        spec["training"]["epochs"] = epochs
        ids.append(client.post("/v1/plans", json=spec).json()["id"])
    page = client.get("/v1/plans", params={"limit": 2}).json()
    assert [p["id"] for p in page["items"]] == ids[::-1][:2]
    page2 = client.get("/v1/plans", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [p["id"] for p in page2["items"]] == ids[::-1][2:4]
    assert client.get("/v1/plans", params={"status": "succeeded"}).json()["items"] == []
    _problem(client.get("/v1/plans", params={"status": "bogus"}), 422)
    _problem(client.get("/v1/plans", params={"cursor": "x"}), 422)


def test_long_poll_returns_after_the_wait(client: TestClient, small_spec: dict[str, Any]) -> None:
    plan = client.post("/v1/plans", json=small_spec).json()
    body = client.get(f"/v1/plans/{plan['id']}", params={"wait": 0.3}).json()
    assert body["status"] == "queued"


def test_system_routes(client: TestClient) -> None:
    gpus = client.get("/v1/gpus").json()["items"]
    assert len(gpus) >= 12 and {"A100-80GB", "H100-80GB", "T4"} <= {g["name"] for g in gpus}
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["schema"] == "0011"  # the newest migration
    metrics = client.get("/metrics").text
    assert 'trainplan_plans{status="queued"}' in metrics
    assert client.get("/v1/workers").json() == {"items": []}
    schema = client.get("/openapi.json").json()
    assert "/v1/plans/{plan_id}/events" in schema["paths"]


def test_token_auth(db_url: str, small_spec: dict[str, Any]) -> None:
    settings = Settings(
        database_url=db_url, embedded_worker=False, auth_mode="token", api_tokens=["s3cret"]
    )
    with TestClient(create_app(settings)) as c:
        _problem(c.post("/v1/plans", json=small_spec), 401)
        ok = c.post("/v1/plans", json=small_spec, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 202
        assert c.get("/healthz").status_code == 200


def test_every_route_documents_an_example(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            bodies = [c for r in op["responses"].values() for c in r.get("content", {}).values()]
            request = op.get("requestBody", {}).get("content", {}).values()
            has = any("example" in b or "examples" in b for b in [*bodies, *request])
            assert has, f"{method.upper()} {path} has no example"


def test_concurrent_submits_are_all_queued(client: TestClient, small_spec: dict[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def submit(i: int) -> int:
        spec = deepcopy(small_spec)
        spec["training"]["epochs"] = 1 + i
        return client.post("/v1/plans", json=spec).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(submit, range(24)))
    assert codes == [202] * 24
    assert len(client.get("/v1/plans", params={"limit": 100}).json()["items"]) == 24


def test_workers_are_told_apart_busy_idle_stopped_and_lost(client: TestClient) -> None:
    from datetime import timedelta

    from service.store import common, registry
    from service.store.models import Worker

    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    with factory() as s:
        for worker_id in ("busy", "idle", "stopped", "lost"):
            registry.register_worker(
                s, worker_id=worker_id, hostname="host", devices={"kinds": ["simulated"]}
            )
        registry.worker_heartbeat(s, worker_id="busy", current_plan="some-plan")
        registry.worker_heartbeat(s, worker_id="stopped", current_plan=None, stopped=True)
        s.execute(
            update(Worker)
            .where(Worker.id == "lost")
            .values(heartbeat_at=common.now() - timedelta(hours=1), current_plan_id="p")
        )
        s.commit()
    states = {w["id"]: w["state"] for w in client.get("/v1/workers").json()["items"]}
    assert states == {"busy": "busy", "idle": "idle", "stopped": "stopped", "lost": "lost"}


def test_a_405_names_every_method_served_at_the_path(client: TestClient) -> None:
    r = client.put("/v1/plans")
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) >= {"GET", "POST"}
    assert r.headers["content-type"].startswith("application/problem+json")
    # routes outside the published schema too: the dashboard's pages and sign-in
    assert client.post("/").headers["allow"] == "GET"
    assert client.put("/sign-in").headers["allow"] == "GET, POST"
    assert client.delete(f"/v1/plans/{'0' * 8}-0000-4000-8000-{'0' * 12}").headers["allow"] == "GET"
