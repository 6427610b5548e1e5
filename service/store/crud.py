"""Queries on the store. The queue's claim is one atomic UPDATE ... RETURNING: on PostgreSQL its
subquery takes the oldest queued row with FOR UPDATE SKIP LOCKED, so N workers never wait on each
other nor claim one plan twice; on SQLite the single statement holds the write lock throughout.

Every function here that writes commits its own transaction: one call is one unit of work, so
the API and the worker loop never commit (or half-commit) on the store's behalf."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased, selectinload

from service.core.principal import DEFAULT_TENANT, key_hash, new_key
from service.schemas.plan import FINAL, PlanStatus
from service.schemas.problem import problem
from service.store.models import ApiKey, AuditEvent, Plan, TrialRow, Worker


def now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def model_label(spec: dict[str, Any]) -> str:
    model = spec.get("model", {})
    return str(
        model.get("name")
        or model.get("preset")
        or model.get("architecture")
        or model.get("source", "?")
    )


# Where PostgreSQL draws plans.seq from (migration 0005).
SEQ_SEQUENCE = "plans_seq_seq"
# What a change to a plan is announced on (PostgreSQL): migration 0006's triggers NOTIFY it
# when a plan's status, attempt or cancel flag changes or a trial is stored, within the writing
# statement; the API's change feed listens.
CHANNEL = "trainplan_plans"


# -- plans -----------------------------------------------------------------------------------
def reuse_key(spec_hash: str, versions: dict[str, str]) -> str:
    """A stored plan answers a new submit only if the same engine, torch and catalogue made it."""
    return hashlib.sha256((spec_hash + json.dumps(versions, sort_keys=True)).encode()).hexdigest()


def find_reusable(session: Session, reuse_key: str, tenant: str) -> Plan | None:
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


def find_answer(session: Session, reuse_key: str) -> Plan | None:
    """Any tenant's newest succeeded plan of this spec by this engine: its result can answer
    another tenant's submit (as a copy, see `create_plan`'s `answer`)."""
    stmt = (
        select(Plan)
        .where(Plan.reuse_key == reuse_key, Plan.status == PlanStatus.succeeded)
        .order_by(Plan.seq.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()


def find_by_idempotency_key(session: Session, key: str) -> Plan | None:
    return session.scalars(select(Plan).where(Plan.idempotency_key == key)).first()


def create_plan(
    session: Session,
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


def _owned(stmt: Any, tenant: str | None) -> Any:
    """Confine a query to one tenant's plans (None: an admin's view of all)."""
    return stmt if tenant is None else stmt.where(Plan.tenant == tenant)


def get_plan(
    session: Session, plan_id: str, with_trials: bool = False, tenant: str | None = None
) -> Plan | None:
    stmt = _owned(select(Plan).where(Plan.id == plan_id), tenant)
    if with_trials:
        stmt = stmt.options(selectinload(Plan.trial_rows))
    return session.scalars(stmt).first()


def stored_body(
    session: Session, plan_id: str, tenant: str | None = None
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


def store_body(session: Session, plan_id: str, body: str, schema: str) -> None:
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


@dataclass
class Page:
    items: Sequence[Any]  # rows of SUMMARY_COLUMNS, or audit events
    next_cursor: str | None


def list_plans(
    session: Session,
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


def _page(rows: list[Any], limit: int, key: str) -> Page:
    """A page of `limit` rows fetched as `limit + 1`: the extra one says there is a next page,
    whose cursor is the last row's `key`."""
    items = rows[:limit]
    more = len(rows) > limit and items
    return Page(items, str(getattr(items[-1], key)) if more else None)


def active_plans(session: Session, tenant: str) -> int:
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


def request_cancel(session: Session, plan_id: str, tenant: str | None = None) -> Plan | None:
    """Queued plans are cancelled at once; running ones stop at their next trial."""
    plan = get_plan(session, plan_id, tenant=tenant)
    if plan is None or plan.status in FINAL:
        return plan
    stamp = now()
    if plan.status == PlanStatus.queued:
        plan.status, plan.finished_at = PlanStatus.cancelled, stamp
    plan.cancel_requested = True
    plan.updated_at = stamp
    session.commit()
    return plan


# -- the queue -------------------------------------------------------------------------------
def claim_next(
    session: Session, worker_id: str, lease_seconds: float, device_kinds: tuple[str, ...]
) -> Plan | None:
    """Atomically take a runnable plan (queued, or running with an expired lease): the one
    with the lowest fair key (`fair_key`), which serves tenants in turn, so one tenant's
    backlog cannot starve another's."""
    stamp = now()
    runnable = or_(
        Plan.status == PlanStatus.queued,
        (Plan.status == PlanStatus.running) & (Plan.lease_until < stamp),
    )
    pick = (
        select(Plan.id)
        .where(runnable, Plan.cancel_requested.is_(False), Plan.device_kind.in_(device_kinds))
        .order_by(Plan.fair_key, Plan.seq)
        .limit(1)
    )
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    stmt = (
        update(Plan)
        .where(Plan.id == pick.scalar_subquery())
        .values(
            status=PlanStatus.running,
            worker_id=worker_id,
            attempts=Plan.attempts + 1,
            lease_until=stamp + timedelta(seconds=lease_seconds),
            started_at=stamp,
            updated_at=stamp,
        )
        .returning(Plan.id)
    )
    plan_id = session.execute(stmt).scalar()
    session.commit()
    return get_plan(session, plan_id) if plan_id else None


def fail_exhausted(session: Session, max_attempts: int) -> int:
    """Fail plans whose lease ended after their last allowed attempt."""
    stamp = now()
    stmt = (
        update(Plan)
        .where(
            Plan.status == PlanStatus.running,
            Plan.lease_until < stamp,
            Plan.attempts >= max_attempts,
        )
        .values(
            status=PlanStatus.failed,
            finished_at=stamp,
            updated_at=stamp,
            error=problem(
                "worker-lost",
                "Plan abandoned",
                f"the worker holding this plan stopped answering "
                f"{max_attempts} times; the plan was failed",
                500,
            ),
        )
    )
    count = rows_changed(session, stmt)
    session.commit()
    return int(count or 0)


def rows_changed(session: Session, stmt: Any) -> int:
    """The rows an UPDATE changed (SQLAlchemy types `execute` as a plain Result, which has no
    rowcount; an UPDATE's is a CursorResult, which has)."""
    result = session.execute(stmt)
    return int(getattr(result, "rowcount", 0) or 0)


def extend_lease(session: Session, plan_id: str, worker_id: str, lease_seconds: float) -> bool:
    """Heartbeat; False when the plan is no longer ours (lease lost, cancelled elsewhere)."""
    stamp = now()
    stmt = (
        update(Plan)
        .where(Plan.id == plan_id, Plan.worker_id == worker_id, Plan.status == PlanStatus.running)
        .values(lease_until=stamp + timedelta(seconds=lease_seconds), updated_at=stamp)
    )
    ok = rows_changed(session, stmt) == 1
    session.commit()
    return ok


def is_cancel_requested(session: Session, plan_id: str) -> bool:
    return bool(session.scalar(select(Plan.cancel_requested).where(Plan.id == plan_id)))


def add_trial(
    session: Session, plan_id: str, attempt: int, index: int, trial: dict[str, Any]
) -> None:
    session.add(
        TrialRow(
            plan_id=plan_id,
            attempt=attempt,
            index=index,
            batch_size=trial["batch_size"],
            fits=trial["fits"],
            peak_bytes=trial["peak_bytes"],
            duration_s=trial["duration_s"],
            phase=trial.get("phase", "search"),
            scenario=trial.get("scenario"),
            reason=trial.get("reason"),
            created_at=now(),
        )
    )
    session.commit()


def signatures(session: Session, plan_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
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


def follow(session: Session, plan_id: str, tenant: str | None = None) -> tuple[Any, ...] | None:
    """The columns a follower of a plan needs (status, attempt, error, answer), not the spec or
    the result."""
    stmt = select(
        Plan.status, Plan.attempts, Plan.cancel_requested, Plan.error, Plan.max_micro_batch_size
    ).where(Plan.id == plan_id)
    row = session.execute(_owned(stmt, tenant)).first()
    return None if row is None else tuple(row)


def trials_of(
    session: Session, plan_id: str, attempt: int | None = None, after_index: int = -1
) -> list[TrialRow]:
    stmt = select(TrialRow).where(TrialRow.plan_id == plan_id, TrialRow.index > after_index)
    if attempt is not None:
        stmt = stmt.where(TrialRow.attempt == attempt)
    return list(session.scalars(stmt.order_by(TrialRow.attempt, TrialRow.index)))


def finish(
    session: Session,
    plan_id: str,
    worker_id: str,
    status: str,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    versions: dict[str, str] | None = None,
    made_with: str | None = None,
) -> bool:
    """Record the end of a plan, only if this worker still holds it (no double finish). The
    worker stamps the `versions` it ran with and their reuse key `made_with` (in a rolling
    upgrade they may differ from the API's that queued the plan)."""
    stamp = now()
    prediction = (result or {}).get("prediction") or {}
    stmt = (
        update(Plan)
        .where(Plan.id == plan_id, Plan.worker_id == worker_id, Plan.status == PlanStatus.running)
        .values(
            status=status,
            result=result,
            error=error,
            finished_at=stamp,
            updated_at=stamp,
            lease_until=None,
            device_name=((result or {}).get("device") or {}).get("name"),
            predicted_max=prediction.get("predicted_max_micro_batch_size"),
            real_max=prediction.get("real_max_micro_batch_size"),
            max_micro_batch_size=(result or {}).get("max_micro_batch_size"),
            **({"versions": versions, "reuse_key": made_with} if versions else {}),
        )
    )
    ok = rows_changed(session, stmt) == 1
    session.commit()
    return ok


def fidelity(session: Session) -> list[dict[str, Any]]:
    """Simulated against real max micro-batch over finished real-device plans, per model and
    device: how many, how often the simulation over-predicted, the mean and worst error."""
    error = (func.abs(Plan.predicted_max - Plan.real_max) * 1.0) / func.nullif(Plan.real_max, 0)
    over = func.sum(case((Plan.predicted_max > Plan.real_max, 1), else_=0))
    rows = session.execute(
        select(
            Plan.model_name,
            Plan.device_kind,
            Plan.device_name,
            func.count(),
            over,
            func.avg(error),
            func.max(error),
        )
        .where(Plan.status == PlanStatus.succeeded, Plan.real_max.is_not(None))
        .group_by(Plan.model_name, Plan.device_kind, Plan.device_name)
        .order_by(Plan.model_name, Plan.device_name)
    ).all()
    return [
        {
            "model": model,
            "device_kind": kind,
            "device": device,
            "plans": count,
            "over_predicted": int(over_count or 0),
            "mean_abs_relative_error": None if mean is None else float(mean),
            "max_abs_relative_error": None if worst is None else float(worst),
        }
        for model, kind, device, count, over_count, mean, worst in rows
    ]


# -- workers ---------------------------------------------------------------------------------
def register_worker(
    session: Session, worker_id: str, hostname: str, devices: dict[str, Any]
) -> None:
    stamp = now()
    worker = session.get(Worker, worker_id)
    if worker is None:
        worker = Worker(
            id=worker_id,
            hostname=hostname,
            devices=devices,
            started_at=stamp,
            heartbeat_at=stamp,
            plans_done=0,
            stopped=False,
        )
        session.add(worker)
    worker.heartbeat_at, worker.stopped = stamp, False
    session.commit()


def worker_heartbeat(
    session: Session,
    worker_id: str,
    current_plan: str | None,
    done_delta: int = 0,
    stopped: bool = False,
) -> None:
    session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(
            heartbeat_at=now(),
            current_plan_id=current_plan,
            plans_done=Worker.plans_done + done_delta,
            stopped=stopped,
        )
    )
    session.commit()


def list_workers(session: Session) -> list[Worker]:
    return list(session.scalars(select(Worker).order_by(Worker.started_at.desc()).limit(500)))


# -- API keys --------------------------------------------------------------------------------
def create_key(
    session: Session, tenant: str, scopes: list[str], hashed: str, prefix: str
) -> ApiKey:
    key = ApiKey(
        id=str(uuid.uuid4()),
        tenant=tenant,
        scopes=",".join(scopes),
        hash=hashed,
        prefix=prefix,
        created_at=now(),
    )
    session.add(key)
    session.commit()
    return key


def issue_key(session: Session, tenant: str, scopes: list[str]) -> tuple[str, ApiKey]:
    """A new key for `tenant`: the secret (shown once, never stored) and its stored row, which
    keeps the hash and the first 10 characters to name it by."""
    key = new_key()
    return key, create_key(session, tenant, scopes, key_hash(key), key[:10])


def find_key(session: Session, hashed: str) -> ApiKey | None:
    """The live (not revoked) key with this hash."""
    return session.scalars(
        select(ApiKey).where(ApiKey.hash == hashed, ApiKey.revoked_at.is_(None))
    ).first()


def touch_key(session: Session, key_id: str) -> None:
    session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now()))
    session.commit()


def take_submit(
    session: Session, key_id: str, capacity: float, per_second: float, at: float
) -> tuple[bool, float]:
    """Take one token from the key's bucket at `at` (epoch seconds): (taken, tokens left).
    One conditional UPDATE, so API processes sharing the store share the bucket: PostgreSQL
    re-checks the WHERE on the row it locked, and SQLite writes one at a time."""
    stored = func.coalesce(ApiKey.rate_tokens, capacity)
    refilled = stored + (at - func.coalesce(ApiKey.rate_at, at)) * per_second
    tokens = case((refilled > capacity, capacity), else_=refilled)
    left = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, tokens >= 1)
        .values(rate_tokens=tokens - 1, rate_at=at)
        .returning(ApiKey.rate_tokens)
    ).scalar_one_or_none()
    if left is not None:
        session.commit()
        return True, float(left)
    row = session.execute(select(tokens).where(ApiKey.id == key_id)).scalar_one_or_none()
    session.rollback()
    return False, float(row if row is not None else 0.0)


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.created_at)
    if tenant:
        stmt = stmt.where(ApiKey.tenant == tenant)
    return list(session.scalars(stmt))


def revoke_key(session: Session, key_id_or_prefix: str) -> list[ApiKey]:
    """Revoke the live key with this id or prefix. A prefix is not unique: when it names several
    keys none is revoked and all are returned, so the caller can ask for the id."""
    keys = list(
        session.scalars(
            select(ApiKey).where(
                or_(ApiKey.id == key_id_or_prefix, ApiKey.prefix == key_id_or_prefix),
                ApiKey.revoked_at.is_(None),
            )
        )
    )
    if len(keys) == 1:
        keys[0].revoked_at = now()
        session.commit()
    return keys


# -- audit -----------------------------------------------------------------------------------
def record_audit(session: Session, events: list[dict[str, Any]]) -> None:
    """Store a batch of audit events (the API buffers them and writes once a second)."""
    if events:
        session.execute(insert(AuditEvent), events)
        session.commit()


def audit_events(
    session: Session,
    tenant: str | None,
    plan_id: str | None,
    key_id: str | None,
    limit: int,
    cursor: int | None,
) -> Page:
    """Newest first; the cursor is the id of the last event of the previous page."""
    stmt = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit + 1)
    if tenant:
        stmt = stmt.where(AuditEvent.tenant == tenant)
    if plan_id:
        stmt = stmt.where(AuditEvent.plan_id == plan_id)
    if key_id:
        stmt = stmt.where(AuditEvent.key_id == key_id)
    if cursor is not None:
        stmt = stmt.where(AuditEvent.id < cursor)
    return _page(list(session.scalars(stmt)), limit, "id")
