"""Completion webhooks in the store: subscribe at submit, claim the due ones, record attempts.

A delivery waits while its plan runs and becomes due when the plan is final (read from the
plan's row: no end path of a plan has to remember to enqueue it). A sender claims a due
delivery with a lease (one UPDATE that only one sender wins), sends it, and records the
attempt: delivered, or retried after a backoff until the plan ended `max_age` ago.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from service.schemas.plan import FINAL
from service.store.common import now, rows_changed
from service.store.models import Delivery, Plan

WAITING, RETRYING, DELIVERED, FAILED = "waiting", "retrying", "delivered", "failed"


def subscribe(session: Session, *, plan_id: str, tenant: str, url: str) -> Delivery:
    """A delivery of `plan_id`'s end to `url` (made due by the plan's end, even if it has
    ended already: a reused plan's submit gets its webhook too)."""
    existing = session.execute(
        select(Delivery).where(
            Delivery.plan_id == plan_id, Delivery.tenant == tenant, Delivery.url == url
        )
    ).scalar_one_or_none()
    if existing is not None:  # the same submit again (an idempotent retry): one delivery
        return existing
    delivery = Delivery(
        id=str(uuid.uuid4()),
        plan_id=plan_id,
        tenant=tenant,
        url=url,
        state=WAITING,
        attempts=0,
        created_at=now(),
    )
    session.add(delivery)
    session.commit()
    return delivery


def claim_due(
    session: Session, *, lease_seconds: float, limit: int = 10
) -> list[tuple[Delivery, Plan]]:
    """Up to `limit` deliveries that are due, each with its plan, leased to the caller."""
    stamp = now()
    free = or_(Delivery.lease_until.is_(None), Delivery.lease_until < stamp)
    due = or_(
        and_(Delivery.state == WAITING, Plan.status.in_(tuple(FINAL))),
        and_(Delivery.state == RETRYING, Delivery.next_attempt_at <= stamp),
    )
    candidates = session.execute(
        select(Delivery.id)
        .join(Plan, Plan.id == Delivery.plan_id)
        .where(due, free)
        .order_by(Delivery.created_at)
        .limit(limit)
    ).scalars()
    lease = stamp + timedelta(seconds=lease_seconds)
    won = []
    for delivery_id in list(candidates):
        stmt = update(Delivery).where(Delivery.id == delivery_id, free).values(lease_until=lease)
        if rows_changed(session, stmt=stmt) == 1:
            won.append(delivery_id)
    session.commit()
    rows = session.execute(
        select(Delivery, Plan).join(Plan, Plan.id == Delivery.plan_id).where(Delivery.id.in_(won))
    ).all()
    return [(row[0], row[1]) for row in rows]


def record_attempt(
    session: Session,
    *,
    delivery_id: str,
    delivered: bool,
    status: int | None,
    error: str | None,
    retry_in: float | None,
) -> None:
    """One attempt's outcome; `retry_in` None after a failure: give up."""
    stamp = now()
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:  # its plan was deleted meanwhile
        return
    delivery.attempts += 1
    delivery.last_status, delivery.last_error = status, error
    delivery.lease_until = None
    if delivered:
        delivery.state, delivery.delivered_at, delivery.next_attempt_at = DELIVERED, stamp, None
    elif retry_in is None:
        delivery.state, delivery.next_attempt_at = FAILED, None
    else:
        delivery.state = RETRYING
        delivery.next_attempt_at = stamp + timedelta(seconds=retry_in)
    session.commit()


def of_plan(session: Session, *, plan_id: str) -> Sequence[Delivery]:
    return (
        session.execute(
            select(Delivery).where(Delivery.plan_id == plan_id).order_by(Delivery.created_at)
        )
        .scalars()
        .all()
    )
