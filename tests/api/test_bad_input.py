"""Bad requests a new user sends in the first hour, each answered with the right status and a
problem that says what to change (issue 24: each of these was answered wrongly before)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.store.db import make_engine, make_session_factory
from workers.loop import PlanWorker


def _problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"]
    return body


def test_invalid_json_is_a_400_naming_line_and_column(client: TestClient) -> None:
    """It was a 422 with the field "24" (a character offset), against the documented 400."""
    sent = b'{"model": {\n  "source": x}}'
    problem = _problem(
        client.post("/v1/plans", content=sent, headers={"content-type": "application/json"}), 400
    )
    assert (problem["line"], problem["column"], problem["position"]) == (2, 13, 24)
    assert "line 2, column 13" in problem["detail"]
    documented = client.get("/openapi.json").json()["paths"]["/v1/plans"]["post"]["responses"]
    assert "400" in documented


def _chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b" " * min(size, total - start)


def test_an_oversized_body_is_a_413_however_it_is_sent(client: TestClient) -> None:
    """Chunked (no Content-Length) it was a 400 'There was an error parsing the body'."""
    json_type = {"content-type": "application/json"}
    limit = 64 * 1024  # the client fixture's max_body_bytes
    declared = client.post("/v1/plans", content=b" " * (limit + 1), headers=json_type)
    chunked = client.post("/v1/plans", content=_chunks(10 * limit), headers=json_type)
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    for answer in (declared, chunked):
        assert "limited to 65536 bytes" in _problem(answer, 413)["detail"]


def test_a_chunked_body_under_the_limit_still_reaches_the_route(
    client: TestClient, small_spec: dict[str, Any]
) -> None:
    import json

    body = json.dumps(small_spec).encode()
    answer = client.post(
        "/v1/plans",
        content=iter([body[:100], body[100:]]),
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 202, answer.text


def test_a_body_not_sent_as_json_is_a_415(client: TestClient, small_spec: dict[str, Any]) -> None:
    """Valid JSON as text/plain was a 422 'Input should be a valid dictionary'."""
    import json

    body = json.dumps(small_spec)
    for headers in (
        {"content-type": "text/plain"},
        {"content-type": "application/x-www-form-urlencoded"},
    ):
        problem = _problem(client.post("/v1/plans", content=body, headers=headers), 415)
        assert "application/json" in problem["detail"]
    typed = client.post(
        "/v1/plans", content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert typed.status_code == 202, typed.text


def test_a_401_names_the_scheme(db_url: str, small_spec: dict[str, Any]) -> None:
    settings = Settings(
        database_url=db_url, embedded_worker=False, auth_mode="token", api_tokens=["s3cret"]
    )
    with TestClient(create_app(settings)) as c:
        none = c.post("/v1/plans", json=small_spec)
        wrong = c.post("/v1/plans", json=small_spec, headers={"Authorization": "Bearer nope"})
    _problem(none, 401)
    assert none.headers["www-authenticate"] == 'Bearer realm="trainplan"'
    _problem(wrong, 401)
    assert wrong.headers["www-authenticate"] == 'Bearer realm="trainplan", error="invalid_token"'


def test_cancelling_a_finished_plan_is_a_409(db_url: str, small_spec: dict[str, Any]) -> None:
    settings = Settings(database_url=db_url, embedded_worker=False)
    with TestClient(create_app(settings)) as c:
        plan_id = c.post("/v1/plans", json=small_spec).json()["id"]
        factory = make_session_factory(make_engine(db_url))
        assert PlanWorker(settings, factory, kinds=("simulated",)).run_once() == 1
        assert c.get(f"/v1/plans/{plan_id}").json()["status"] == "succeeded"
        problem = _problem(c.post(f"/v1/plans/{plan_id}/cancel"), 409)
        assert "already succeeded" in problem["detail"]
        assert c.get(f"/v1/plans/{plan_id}").json()["status"] == "succeeded"
        queued = c.post("/v1/plans", json=small_spec | {"refresh": True}).json()["id"]
        assert c.post(f"/v1/plans/{queued}/cancel").status_code == 202
        assert c.post(f"/v1/plans/{queued}/cancel").status_code == 202  # idempotent


def test_training_world_size_auto_is_accepted(
    client: TestClient, small_spec: dict[str, Any]
) -> None:
    """It was 'Input should be a valid integer' with no hint of parallelism.world_size."""
    small_spec["training"]["world_size"] = "auto"
    answer = client.post("/v1/plans", json=small_spec)
    assert answer.status_code == 202, answer.text
    assert answer.json()["spec"]["training"]["parallelism"]["world_size"] == "auto"
    small_spec["training"]["parallelism"] = {"world_size": 4}
    problem = _problem(client.post("/v1/plans", json=small_spec), 422)
    assert problem["errors"][0]["field"] == "training"
    assert "differ" in problem["errors"][0]["msg"]
