"""The audit trail: who submitted, cancelled, read or followed what.

Every function here that writes commits its own transaction: one call is one unit of work,
so the API and the worker loop never commit (or half-commit) on the store's behalf."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from service.store.common import Page, _page
from service.store.models import AuditEvent


def record_audit(session: Session, *, events: list[dict[str, Any]]) -> None:
    """Store a batch of audit events (the API buffers them and writes once a second)."""
    if events:
        session.execute(insert(AuditEvent), events)
        session.commit()


def audit_events(
    session: Session,
    *,
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
