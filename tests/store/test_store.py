"""The store and its queue, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import update

from service.schemas.spec import PlanSpec
from service.store import crud
from service.store.db import make_engine, make_session_factory, upgrade
from service.store.models import Plan


def _factory(db_url: str) -> Any:
    upgrade(db_url)
    return make_session_factory(make_engine(db_url))


def _add(factory: Any, spec: dict[str, Any], n: int = 1) -> list[str]:
    ids = []
    with factory() as session:
        for i in range(n):
            parsed = PlanSpec.model_validate(spec | {"training": {"epochs": i + 1}})
            ids.append(crud.create_plan(session, parsed.canonical(), parsed.spec_hash).id)
        session.commit()
    return ids


def test_claim_is_fifo_and_exclusive(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    ids = _add(factory, small_spec, 3)
    with factory() as s:
        first = crud.claim_next(s, "w1", 30, ("simulated",))
        second = crud.claim_next(s, "w2", 30, ("simulated",))
    assert first is not None and second is not None
    assert [first.id, second.id] == ids[:2]
    assert first.status == "running" and first.attempts == 1 and first.worker_id == "w1"


def test_claim_respects_device_kinds(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    _add(factory, small_spec | {"device": {"kind": "cuda"}})
    with factory() as s:
        assert crud.claim_next(s, "cpu-only", 30, ("simulated", "cpu")) is None
        assert crud.claim_next(s, "gpu", 30, ("simulated", "cpu", "cuda")) is not None


def test_concurrent_claims_never_share_a_plan(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    ids = _add(factory, small_spec, 40)
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while True:
            with factory() as s:
                plan = crud.claim_next(s, name, 30, ("simulated",))
            if plan is None:
                return
            with lock:
                claimed.append(plan.id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_expired_lease_is_claimed_again_then_failed_after_max_attempts(
    db_url: str, small_spec: dict[str, Any]
) -> None:
    factory = _factory(db_url)
    (plan_id,) = _add(factory, small_spec)
    with factory() as s:
        assert crud.claim_next(s, "dead", 0.05, ("simulated",)) is not None
    time.sleep(0.1)
    with factory() as s:
        again = crud.claim_next(s, "alive", 0.05, ("simulated",))
        assert again is not None and again.id == plan_id and again.attempts == 2
        # the dead worker cannot finish it any more
        assert not crud.finish(s, plan_id, "dead", "succeeded", result={})
    time.sleep(0.1)
    with factory() as s:
        assert crud.fail_exhausted(s, max_attempts=2) == 1
        plan = crud.get_plan(s, plan_id)
        assert plan is not None and plan.status == "failed"
        assert plan.error is not None and plan.error["type"].endswith("worker-lost")


def test_heartbeat_extends_only_our_lease(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    (plan_id,) = _add(factory, small_spec)
    with factory() as s:
        crud.claim_next(s, "w1", 30, ("simulated",))
        assert crud.extend_lease(s, plan_id, "w1", 30)
        assert not crud.extend_lease(s, plan_id, "w2", 30)
        assert crud.finish(s, plan_id, "w1", "succeeded", result={"ok": 1})
        assert not crud.finish(s, plan_id, "w1", "failed")  # never ends twice


def test_cancel_queued_and_running(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    queued, running = _add(factory, small_spec, 2)
    with factory() as s:
        crud.claim_next(s, "w", 30, ("simulated",))  # takes `queued` (the oldest)
        s.execute(update(Plan).where(Plan.id == queued).values(status="queued"))
        s.execute(update(Plan).where(Plan.id == running).values(status="running"))
        s.commit()
        assert crud.request_cancel(s, queued).status == "cancelled"  # type: ignore[union-attr]
        plan = crud.request_cancel(s, running)
        s.commit()
        assert plan is not None and plan.status == "running" and plan.cancel_requested
        assert crud.is_cancel_requested(s, running)


def test_list_pages_with_a_cursor_and_filters(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    ids = _add(factory, small_spec, 7)
    seen: list[str] = []
    cursor = None
    with factory() as s:
        while True:
            page = crud.list_plans(s, None, None, 3, cursor)
            seen += [p.id for p in page.items]
            if page.next_cursor is None:
                break
            cursor = int(page.next_cursor)
        assert seen == list(reversed(ids))
        assert crud.list_plans(s, "succeeded", None, 10, None).items == []
        assert len(crud.list_plans(s, "queued", "layers", 10, None).items) == 7
        assert crud.queue_depth(s) == {"queued": 7}


def test_dedupe_by_hash_and_idempotency_key(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    spec = PlanSpec.model_validate(small_spec)
    with factory() as s:
        plan = crud.create_plan(s, spec.canonical(), spec.spec_hash, "key-1", {}, "k" * 64)
        s.commit()
        assert crud.find_reusable(s, "k" * 64, "default").id == plan.id  # type: ignore[union-attr]
        assert crud.find_reusable(s, "k" * 64, "other") is None  # another tenant's
        assert crud.find_by_idempotency_key(s, "key-1").id == plan.id  # type: ignore[union-attr]
        assert crud.find_reusable(s, "0" * 64, "default") is None


def test_claims_serve_tenants_in_turn(db_url: str, small_spec: dict[str, Any]) -> None:
    """One tenant's backlog of 6 does not starve another's 2 plans submitted after it: with
    two workers' worth of plans running, each claim goes to the tenant running fewer."""
    factory = _factory(db_url)
    spec = PlanSpec.model_validate(small_spec)
    with factory() as s:
        for tenant in ["big"] * 6 + ["small"] * 2:
            crud.create_plan(s, spec.canonical(), spec.spec_hash, tenant=tenant)
        order = []
        for i in range(4):
            plan = crud.claim_next(s, f"w{i}", 60, ("simulated",))
            assert plan is not None
            order.append(plan.tenant)
        assert order == ["big", "small", "big", "small"]
        # "small" has no plan left to run: the next claim goes to "big" whatever it runs
        crud.finish(s, plan.id, "w3", "succeeded", result={})
        assert crud.claim_next(s, "w4", 60, ("simulated",)).tenant == "big"  # type: ignore[union-attr]
        # a tenant arriving behind a backlog joins at its head, not its tail
        for _ in range(2):
            crud.create_plan(s, spec.canonical(), spec.spec_hash, tenant="late")
        order = [crud.claim_next(s, f"x{i}", 60, ("simulated",)) for i in range(4)]
        assert [p.tenant for p in order if p] == ["big", "late", "big", "late"]
