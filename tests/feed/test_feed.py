"""The change feed (issue 14): one read per change of a plan, however many clients follow it;
SSE resumes at Last-Event-ID; a long poll wakes when the plan ends. On both stores: SQLite's
feed polls, PostgreSQL's listens to the worker's NOTIFY."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.feed import hub
from service.feed.events import Cursor, events
from service.feed.hub import PlanFeed, PlanState
from service.schemas.plan import PlanStatus
from service.store import claims, common
from service.store.db import make_engine, make_session_factory, upgrade
from service.store.models import Plan
from tests.helpers import enqueue

TRIAL = {"batch_size": 8, "fits": True, "peak_bytes": 1 << 20, "duration_s": 0.01}


def _claimed(factory: Any, spec: dict[str, Any], worker: str = "w") -> str:
    plan_id = enqueue(factory, spec)
    with factory() as s:
        assert (
            claims.claim_next(s, worker_id=worker, lease_seconds=60, device_kinds=("simulated",))
            is not None
        )
    return plan_id


def _add(factory: Any, plan_id: str, attempt: int, index: int) -> None:
    with factory() as s:
        claims.add_trial(
            s,
            plan_id=plan_id,
            attempt=attempt,
            index=index,
            trial=TRIAL | {"batch_size": 8 + index},
        )


def _cancel_by_worker(factory: Any, plan_id: str, worker: str = "w") -> None:
    error = {"type": "about:blank", "title": "Plan cancelled", "status": 409, "detail": "test"}
    with factory() as s:
        assert claims.finish(s, plan_id=plan_id, worker_id=worker, status="cancelled", error=error)


def _later(delay: float, *steps: Any) -> threading.Thread:
    def run() -> None:
        for step in steps:
            time.sleep(delay)
            step()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _events(body: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, event, data) of each event in a text/event-stream body."""
    out = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["id"], fields["event"], json.loads(fields["data"])))
    return out


def test_one_read_per_change_however_many_follow(
    db_url: str, small_spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade(db_url)
    factory = make_session_factory(make_engine(db_url))
    plan_id = _claimed(factory, small_spec)
    loads: list[str] = []
    real_load = hub._load

    def counted(*args: Any) -> Any:
        loads.append(args[1])
        return real_load(*args)

    monkeypatch.setattr(hub, "_load", counted)

    async def scenario() -> None:
        feed = PlanFeed(factory)
        async with AsyncExitStack() as stack:
            followers = [await stack.enter_async_context(feed.watch(plan_id)) for _ in range(50)]
            assert len(loads) == 1 and all(f is followers[0] for f in followers)
            followed = followers[0]
            version = followed.version
            await asyncio.to_thread(_add, factory, plan_id, 1, 0)
            for _ in range(3):  # a burst of signals while the first reload runs
                feed.changed([plan_id])
            assert await followed.wait(version, 10)
            await asyncio.sleep(0.5)  # let the coalesced reload finish
            assert followed.state is not None and followed.state.last_index == 0
            assert len(loads) == 3  # the first read, one reload, one for the burst's rest
            feed.changed(["not-followed"])
            assert len(loads) == 3
        assert feed.followed == {}
        await feed.close()

    asyncio.run(scenario())


def test_sse_resumes_at_last_event_id(client: TestClient, small_spec: dict[str, Any]) -> None:
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    plan_id = _claimed(factory, small_spec)
    for index in (0, 1):
        _add(factory, plan_id, 1, index)
    url = f"/v1/plans/{plan_id}/events"
    writer = _later(
        0.6, lambda: _add(factory, plan_id, 1, 2), lambda: _cancel_by_worker(factory, plan_id)
    )
    response = client.get(url, headers={"Last-Event-ID": "1.0"})
    writer.join()
    assert response.status_code == 200
    got = _events(response.text)
    assert [(i, e) for i, e, _ in got] == [("1.1", "trial"), ("1.2", "trial"), ("1.end", "end")]
    assert [d["batch_size"] for _, e, d in got if e == "trial"] == [9, 10]
    assert got[-1][2]["status"] == "cancelled"
    # a new stream replays everything; one resumed after the end is told not to reconnect
    replay = _events(client.get(url).text)
    assert [i for i, _, _ in replay] == ["1.0", "1.1", "1.2", "1.end"]
    assert client.get(url, headers={"Last-Event-ID": "1.end"}).status_code == 204
    assert client.get(url, headers={"Last-Event-ID": "junk"}).text == client.get(url).text


def test_sse_tells_a_resumed_client_of_a_new_attempt(
    client: TestClient, small_spec: dict[str, Any]
) -> None:
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    plan_id = _claimed(factory, small_spec, "lost")
    _add(factory, plan_id, 1, 0)
    with factory() as s:  # its worker is lost: the lease runs out and another claims it
        s.execute(
            update(Plan)
            .where(Plan.id == plan_id)
            .values(lease_until=common.now() - timedelta(seconds=1))
        )
        s.commit()
        assert (
            claims.claim_next(s, worker_id="w", lease_seconds=60, device_kinds=("simulated",))
            is not None
        )
    _add(factory, plan_id, 2, 0)
    writer = _later(0.3, lambda: _cancel_by_worker(factory, plan_id))
    got = _events(client.get(f"/v1/plans/{plan_id}/events", headers={"Last-Event-ID": "1.0"}).text)
    writer.join()
    assert [(i, e) for i, e, _ in got] == [("2.-1", "retry"), ("2.0", "trial"), ("2.end", "end")]
    assert got[0][2] == {"attempt": 2}


def test_a_long_poll_wakes_when_the_plan_ends(
    client: TestClient, small_spec: dict[str, Any]
) -> None:
    factory = client.app.state.session_factory  # type: ignore[attr-defined]
    plan_id = _claimed(factory, small_spec)
    writer = _later(
        0.5, lambda: _add(factory, plan_id, 1, 0), lambda: _cancel_by_worker(factory, plan_id)
    )
    waited = client.get(f"/v1/plans/{plan_id}", params={"wait": 30})
    writer.join()
    assert waited.status_code == 200 and waited.json()["status"] == "cancelled"
    assert [t["batch_size"] for t in waited.json()["trials"]] == [8]
    assert waited.json() == client.get(f"/v1/plans/{plan_id}").json()
    assert client.get("/v1/plans/nope", params={"wait": 5}).status_code == 404
    assert client.get("/v1/plans/nope/events").status_code == 404


def test_events_follow_the_cursor() -> None:
    state = PlanState(PlanStatus.running, 1, False, None, None)
    state.trials = [TRIAL | {"index": i, "attempt": 1} for i in range(3)]
    cursor = Cursor.parse("1.1")
    assert [c.split(b"\n")[0] for c in events(state, cursor)] == [b"id: 1.2"]
    assert list(events(state, cursor)) == []  # nothing new
    state.status = PlanStatus.succeeded
    assert [c.split(b"\n")[1] for c in events(state, cursor)] == [b"event: end"]
    assert Cursor.parse("7.end") == Cursor(7, -1, True)
    assert Cursor.parse("1.2; DROP") == Cursor() == Cursor.parse(None)


def test_the_client_resumes_a_dropped_stream_where_it_broke() -> None:
    import httpx

    from service.client import TrainplanClient

    asked: list[str | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("last-event-id"))
        if len(asked) == 1:

            def dropped() -> Any:
                yield b'id: 1.0\nevent: trial\ndata: {"index": 0}\n\n'
                raise httpx.RemoteProtocolError("peer closed connection")

            return httpx.Response(200, content=dropped())
        return httpx.Response(
            200,
            content=b'id: 1.1\nevent: trial\ndata: {"index": 1}\n\n'
            b'id: 1.end\nevent: end\ndata: {"status": "succeeded"}\n\n',
        )

    with TrainplanClient("http://test", transport=httpx.MockTransport(server)) as client:
        got = list(client.events("p"))
    assert [(e, d.get("index")) for e, d in got] == [("trial", 0), ("trial", 1), ("end", None)]
    assert asked == [None, "1.0"]
