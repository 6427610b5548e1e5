"""Plans as clients see them: create (with the fair key), find for reuse or idempotency, read,
list, count, cancel, and the stored serialised bodies.

Every function here that writes commits its own transaction: one call is one unit of work,
so the API and the worker loop never commit (or half-commit) on the store's behalf."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased, selectinload

from service.core.principal import DEFAULT_TENANT
from service.schemas.plan import FINAL, PlanStatus
from service.store.common import SEQ_SEQUENCE, Page, _owned, _page, model_label, now
from service.store.models import Plan, TrialRow


def reuse_key(spec_hash: str, versions: dict[str, str]) -> str:
    """A stored plan answers a new submit only if the same engine, torch and catalogue made it."""
    return hashlib.sha256((spec_hash + json.dumps(versions, sort_keys=True)).encode()).hexdigest()


def find_reusable(session: Session, *, reuse_key: str, tenant: str) -> Plan | None:
    """The tenant's newest plan of this spec, by this engine, that did not fail or get
    cancelled."""
    stmt = (
        select(Plan)
        .where(
            Plan.reuse_key == reuse_key,
            Plan.tenant == tenant,
            Plan.status.in_((PlanStatus.queued, PlanStatus.running, PlanStatus.succeeded)),
        )
        .order_by(Plan.seq.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()


def find_answer(session: Session, *, reuse_key: str) -> Plan | None:
    """Any tenant's newest succeeded plan of this spec by this engine: its result can answer
    another tenant's submit (as a copy, see `create_plan`'s `answer`)."""
    stmt = (
        select(Plan)
        .where(Plan.reuse_key == reuse_key, Plan.status == PlanStatus.succeeded)
        .order_by(Plan.seq.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()


def find_by_idempotency_key(session: Session, *, key: str) -> Plan | None:
    return session.scalars(select(Plan).where(Plan.idempotency_key == key)).first()


def create_plan(
    session: Session,
    *,
    spec: dict[str, Any],
    spec_hash: str,
    idempotency_key: str | None = None,
    versions: dict[str, str] | None = None,
    reuse_key: str | None = None,
    tenant: str = DEFAULT_TENANT,
    answer: Plan | None = None,
) -> Plan:
    """Queue a plan for `tenant`; with `answer` (another tenant's succeeded plan of the same
    spec and versions), record it already succeeded with a copy of that result: the new plan
    has its own id and times, so nothing of the other tenant's plan shows."""
    stamp = now()
    # PostgreSQL draws it from a sequence (max + 1 collided under concurrent submits); on
    # SQLite, max + 1 inside the INSERT is atomic (the statement holds the write lock).
    next_seq: Any = (
        func.nextval(SEQ_SEQUENCE)
        if session.get_bind().dialect.name == "postgresql"
        else select(func.coalesce(func.max(Plan.seq), 0) + 1).scalar_subquery()
    )
    plan = Plan(
        id=str(uuid.uuid4()),
        seq=next_seq,
        fair_key=fair_key(tenant),
        status=PlanStatus.queued,
        spec=spec,
        spec_hash=spec_hash,
        versions=versions,
        reuse_key=reuse_key,
        model_name=model_label(spec)[:200],
        device_kind=spec.get("device", {}).get("kind", "simulated"),
        idempotency_key=idempotency_key,
        created_at=stamp,
        updated_at=stamp,
        attempts=0,
        cancel_requested=False,
        tenant=tenant,
    )
    if answer is not None:
        plan.status, plan.started_at, plan.finished_at = PlanStatus.succeeded, stamp, stamp
        plan.result = answer.result
        plan.max_micro_batch_size = answer.max_micro_batch_size
    session.add(plan)
    session.flush()
    session.refresh(plan, ["seq"])
    session.commit()
    return plan


def fair_key(tenant: str) -> Any:
    """A new plan's virtual start time, as SQL evaluated inside its INSERT: one past the
    tenant's last queued plan or, when it has none queued, one past the queue's frontier (just
    before the oldest queued plan; the newest plan's key when nothing is queued). The tenant's
    last queued key is never behind the frontier, so no comparison is needed. A tenant's k-th
    queued plan thus sits k slots past the frontier whoever else has a backlog: claims in key
    order serve tenants round-robin, and concurrent claims (SKIP LOCKED takes the next key)
    interleave them too."""
    queued = aliased(Plan)
    frontier = func.coalesce(
        select(func.min(queued.fair_key) - 1)
        .where(queued.status == PlanStatus.queued)
        .scalar_subquery(),
        select(func.max(queued.fair_key)).scalar_subquery(),
        0,
    )
    own = (
        select(func.max(queued.fair_key))
        .where(queued.tenant == tenant, queued.status == PlanStatus.queued)
        .scalar_subquery()
    )
    return func.coalesce(own, frontier) + 1


def get_plan(
    session: Session, *, plan_id: str, with_trials: bool = False, tenant: str | None = None
) -> Plan | None:
    stmt = _owned(select(Plan).where(Plan.id == plan_id), tenant)
    if with_trials:
        stmt = stmt.options(selectinload(Plan.trial_rows))
    return session.scalars(stmt).first()


def stored_body(
    session: Session, *, plan_id: str, tenant: str | None = None
) -> tuple[str, str | None, str | None] | None:
    """(status, body, body_schema) of a plan, without loading the rest of its row."""
    # On the session's connection: a Core statement needs none of the ORM's execution path,
    # and this is the whole of a GET of a finished plan.
    row = (
        session.connection()
        .execute(
            _owned(
                select(Plan.status, Plan.body, Plan.body_schema).where(Plan.id == plan_id), tenant
            )
        )
        .first()
    )
    return None if row is None else (row[0], row[1], row[2])


def store_body(session: Session, *, plan_id: str, body: str, schema: str) -> None:
    """Keep a finished plan's serialised response (a plan only ever changes until it ends)."""
    session.execute(
        update(Plan)
        .where(Plan.id == plan_id, Plan.status.in_(tuple(FINAL)))
        .values(body=body, body_schema=schema)
    )
    session.commit()


# What the list shows (`PlanSummary`), and `seq` for its cursor: not the spec nor the result.
SUMMARY_COLUMNS = (
    Plan.id,
    Plan.seq,
    Plan.status,
    Plan.created_at,
    Plan.finished_at,
    Plan.model_name,
    Plan.spec_hash,
    Plan.max_micro_batch_size,
)


def list_plans(
    session: Session,
    *,
    status: str | None,
    model: str | None,
    limit: int,
    cursor: int | None,
    tenant: str | None = None,
) -> Page:
    """Newest first; the cursor is the `seq` of the last plan of the previous page."""
    stmt = _owned(select(*SUMMARY_COLUMNS).order_by(Plan.seq.desc()).limit(limit + 1), tenant)
    if status:
        stmt = stmt.where(Plan.status == status)
    if model:
        stmt = stmt.where(Plan.model_name == model)
    if cursor is not None:
        stmt = stmt.where(Plan.seq < cursor)
    return _page(list(session.execute(stmt).all()), limit, "seq")


def active_plans(session: Session, *, tenant: str) -> int:
    """The tenant's plans queued or running."""
    return int(
        session.scalar(
            select(func.count()).where(
                Plan.tenant == tenant,
                Plan.status.in_((PlanStatus.queued, PlanStatus.running)),
            )
        )
        or 0
    )


def queue_depth(session: Session) -> dict[str, int]:
    rows = session.execute(select(Plan.status, func.count()).group_by(Plan.status)).all()
    return {status: count for status, count in rows}


def request_cancel(session: Session, *, plan_id: str, tenant: str | None = None) -> Plan | None:
    """Queued plans are cancelled at once; running ones stop at their next trial."""
    plan = get_plan(session, plan_id=plan_id, tenant=tenant)
    if plan is None or plan.status in FINAL:
        return plan
    stamp = now()
    if plan.status == PlanStatus.queued:
        plan.status, plan.finished_at = PlanStatus.cancelled, stamp
    plan.cancel_requested = True
    plan.updated_at = stamp
    session.commit()
    return plan


def signatures(session: Session, *, plan_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """What a follower sees change, per plan, in one query: status, attempt, cancel flag and the
    last trial's index (the SQLite change feed polls this for every plan it is watching)."""
    last_trial = (
        select(func.max(TrialRow.index))
        .where(TrialRow.plan_id == Plan.id, TrialRow.attempt == Plan.attempts)
        .correlate(Plan)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Plan.id, Plan.status, Plan.attempts, Plan.cancel_requested, last_trial).where(
            Plan.id.in_(plan_ids)
        )
    ).all()
    return {row[0]: tuple(row[1:]) for row in rows}


def follow(session: Session, *, plan_id: str, tenant: str | None = None) -> tuple[Any, ...] | None:
    """The columns a follower of a plan needs (status, attempt, error, answer), not the spec or
    the result."""
    stmt = select(
        Plan.status, Plan.attempts, Plan.cancel_requested, Plan.error, Plan.max_micro_batch_size
    ).where(Plan.id == plan_id)
    row = session.execute(_owned(stmt, tenant)).first()
    return None if row is None else tuple(row)


def trials_of(
    session: Session, *, plan_id: str, attempt: int | None = None, after_index: int = -1
) -> list[TrialRow]:
    stmt = select(TrialRow).where(TrialRow.plan_id == plan_id, TrialRow.index > after_index)
    if attempt is not None:
        stmt = stmt.where(TrialRow.attempt == attempt)
    return list(session.scalars(stmt.order_by(TrialRow.attempt, TrialRow.index)))
