"""What the store's modules share: the clock, SQLite's naive datetimes, a model's label, an
UPDATE's row count, the tenancy filter and cursor pages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from service.store.models import Plan


def now() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
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


def rows_changed(session: Session, *, stmt: Any) -> int:
    """The rows an UPDATE changed (SQLAlchemy types `execute` as a plain Result, which has no
    rowcount; an UPDATE's is a CursorResult, which has)."""
    result = session.execute(stmt)
    return int(getattr(result, "rowcount", 0) or 0)


def _owned(stmt: Any, tenant: str | None) -> Any:
    """Confine a query to one tenant's plans (None: an admin's view of all)."""
    return stmt if tenant is None else stmt.where(Plan.tenant == tenant)


def _page(rows: list[Any], limit: int, key: str) -> Page:
    """A page of `limit` rows fetched as `limit + 1`: the extra one says there is a next page,
    whose cursor is the last row's `key`."""
    items = rows[:limit]
    more = len(rows) > limit and items
    return Page(items, str(getattr(items[-1], key)) if more else None)


@dataclass
class Page:
    items: Sequence[Any]  # rows of SUMMARY_COLUMNS, or audit events
    next_cursor: str | None


# Where PostgreSQL draws plans.seq from (migration 0005).
SEQ_SEQUENCE = "plans_seq_seq"


# What a change to a plan is announced on (PostgreSQL): migration 0006's triggers NOTIFY it
# when a plan's status, attempt or cancel flag changes or a trial is stored, within the writing
# statement; the API's change feed listens.
CHANNEL = "trainplan_plans"
