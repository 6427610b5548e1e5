"""The store and its queue, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import update

from service.schemas.spec import PlanSpec
from service.store import claims, plans
from service.store.db import make_engine, make_session_factory, upgrade
from service.store.models import Plan
from tests.helpers import a_result


def _factory(db_url: str) -> Any:
    upgrade(db_url)
    return make_session_factory(make_engine(db_url))


def _add(factory: Any, spec: dict[str, Any], n: int = 1) -> list[str]:
    ids = []
    with factory() as session:
        for i in range(n):
            parsed = PlanSpec.model_validate(spec | {"training": {"epochs": i + 1}})
            ids.append(
                plans.create_plan(session, spec=parsed.canonical(), spec_hash=parsed.spec_hash).id
            )
        session.commit()
    return ids


def test_claim_is_fifo_and_exclusive(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    ids = _add(factory, small_spec, 3)
    with factory() as s:
        first = claims.claim_next(s, worker_id="w1", lease_seconds=30, device_kinds=("simulated",))
        second = claims.claim_next(s, worker_id="w2", lease_seconds=30, device_kinds=("simulated",))
    assert first is not None and second is not None
    assert [first.id, second.id] == ids[:2]
    assert first.status == "running" and first.attempts == 1 and first.worker_id == "w1"


def test_claim_respects_device_kinds(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    _add(factory, small_spec | {"device": {"kind": "cuda"}})
    with factory() as s:
        assert (
            claims.claim_next(
                s, worker_id="cpu-only", lease_seconds=30, device_kinds=("simulated", "cpu")
            )
            is None
        )
        assert (
            claims.claim_next(
                s, worker_id="gpu", lease_seconds=30, device_kinds=("simulated", "cpu", "cuda")
            )
            is not None
        )


def test_concurrent_claims_never_share_a_plan(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    ids = _add(factory, small_spec, 40)
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while True:
            with factory() as s:
                plan = claims.claim_next(
                    s, worker_id=name, lease_seconds=30, device_kinds=("simulated",)
                )
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
        assert (
            claims.claim_next(s, worker_id="dead", lease_seconds=0.05, device_kinds=("simulated",))
            is not None
        )
    time.sleep(0.1)
    with factory() as s:
        again = claims.claim_next(
            s, worker_id="alive", lease_seconds=0.05, device_kinds=("simulated",)
        )
        assert again is not None and again.id == plan_id and again.attempts == 2
        # the dead worker cannot finish it any more
        assert not claims.finish(
            s, plan_id=plan_id, worker_id="dead", status="succeeded", result=a_result()
        )
    time.sleep(0.1)
    with factory() as s:
        assert claims.fail_exhausted(s, max_attempts=2) == 1
        plan = plans.get_plan(s, plan_id=plan_id)
        assert plan is not None and plan.status == "failed"
        assert plan.error is not None and plan.error["type"].endswith("worker-lost")


def test_heartbeat_extends_only_our_lease(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    (plan_id,) = _add(factory, small_spec)
    with factory() as s:
        claims.claim_next(s, worker_id="w1", lease_seconds=30, device_kinds=("simulated",))
        assert claims.extend_lease(s, plan_id=plan_id, worker_id="w1", lease_seconds=30)
        assert not claims.extend_lease(s, plan_id=plan_id, worker_id="w2", lease_seconds=30)
        assert claims.finish(
            s, plan_id=plan_id, worker_id="w1", status="succeeded", result=a_result()
        )
        assert not claims.finish(
            s, plan_id=plan_id, worker_id="w1", status="failed"
        )  # never ends twice


def test_cancel_queued_and_running(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    queued, running = _add(factory, small_spec, 2)
    with factory() as s:
        claims.claim_next(
            s, worker_id="w", lease_seconds=30, device_kinds=("simulated",)
        )  # takes `queued` (the oldest)
        s.execute(update(Plan).where(Plan.id == queued).values(status="queued"))
        s.execute(update(Plan).where(Plan.id == running).values(status="running"))
        s.commit()
        assert plans.request_cancel(s, plan_id=queued).status == "cancelled"  # type: ignore[union-attr]
        plan = plans.request_cancel(s, plan_id=running)
        s.commit()
        assert plan is not None and plan.status == "running" and plan.cancel_requested
        assert claims.is_cancel_requested(s, plan_id=running)


def test_list_pages_with_a_cursor_and_filters(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    ids = _add(factory, small_spec, 7)
    seen: list[str] = []
    cursor = None
    with factory() as s:
        while True:
            page = plans.list_plans(s, status=None, model=None, limit=3, cursor=cursor)
            seen += [p.id for p in page.items]
            if page.next_cursor is None:
                break
            cursor = int(page.next_cursor)
        assert seen == list(reversed(ids))
        assert (
            plans.list_plans(s, status="succeeded", model=None, limit=10, cursor=None).items == []
        )
        assert (
            len(plans.list_plans(s, status="queued", model="layers", limit=10, cursor=None).items)
            == 7
        )
        assert plans.queue_depth(s) == {"queued": 7}


def test_dedupe_by_hash_and_idempotency_key(db_url: str, small_spec: dict[str, Any]) -> None:
    factory = _factory(db_url)
    spec = PlanSpec.model_validate(small_spec)
    with factory() as s:
        plan = plans.create_plan(
            s,
            spec=spec.canonical(),
            spec_hash=spec.spec_hash,
            idempotency_key="key-1",
            versions={},
            reuse_key="k" * 64,
        )
        s.commit()
        assert plans.find_reusable(s, reuse_key="k" * 64, tenant="default").id == plan.id  # type: ignore[union-attr]
        assert (
            plans.find_reusable(s, reuse_key="k" * 64, tenant="other") is None
        )  # another tenant's
        assert plans.find_by_idempotency_key(s, key="key-1").id == plan.id  # type: ignore[union-attr]
        assert plans.find_reusable(s, reuse_key="0" * 64, tenant="default") is None


def test_claims_serve_tenants_in_turn(db_url: str, small_spec: dict[str, Any]) -> None:
    """One tenant's backlog of 6 does not starve another's 2 plans submitted after it: with
    two workers' worth of plans running, each claim goes to the tenant running fewer."""
    factory = _factory(db_url)
    spec = PlanSpec.model_validate(small_spec)
    with factory() as s:
        for tenant in ["big"] * 6 + ["small"] * 2:
            plans.create_plan(s, spec=spec.canonical(), spec_hash=spec.spec_hash, tenant=tenant)
        order = []
        for i in range(4):
            plan = claims.claim_next(
                s, worker_id=f"w{i}", lease_seconds=60, device_kinds=("simulated",)
            )
            assert plan is not None
            order.append(plan.tenant)
        assert order == ["big", "small", "big", "small"]
        # "small" has no plan left to run: the next claim goes to "big" whatever it runs
        claims.finish(s, plan_id=plan.id, worker_id="w3", status="succeeded", result=a_result())
        assert (
            claims.claim_next(
                s, worker_id="w4", lease_seconds=60, device_kinds=("simulated",)
            ).tenant
            == "big"
        )  # type: ignore[union-attr]
        # a tenant arriving behind a backlog joins at its head, not its tail
        for _ in range(2):
            plans.create_plan(s, spec=spec.canonical(), spec_hash=spec.spec_hash, tenant="late")
        order = [
            claims.claim_next(s, worker_id=f"x{i}", lease_seconds=60, device_kinds=("simulated",))
            for i in range(4)
        ]
        assert [p.tenant for p in order if p] == ["big", "late", "big", "late"]
