"""The worker registry: who is working, their heartbeats.

Every function here that writes commits its own transaction: one call is one unit of work,
so the API and the worker loop never commit (or half-commit) on the store's behalf."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.store.common import now
from service.store.models import Worker


def register_worker(
    session: Session, *, worker_id: str, hostname: str, devices: dict[str, Any]
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
    *,
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
