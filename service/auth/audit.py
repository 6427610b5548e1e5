"""The audit trail: which key submitted, cancelled, read, listed or followed what (with API keys,
`TRAINPLAN_AUTH_MODE=keys`). Events are buffered in the API process and written in one batch a
second, so a read does not pay a write: a crash loses at most the last second's events."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from service.core.principal import Principal
from service.store import audit_trail, common

log = structlog.get_logger("trainplan.audit")


class AuditLog:
    def __init__(self, factory: sessionmaker[Session], enabled: bool) -> None:
        self.factory, self.enabled = factory, enabled
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, principal: Principal, action: str, plan_id: str | None = None) -> None:
        if not self.enabled:
            return
        event = {
            "at": common.now(),
            "tenant": principal.tenant,
            "key_id": principal.key_id,
            "action": action,
            "plan_id": plan_id,
        }
        with self._lock:
            self._pending.append(event)

    def flush(self) -> None:
        with self._lock:
            events, self._pending = self._pending, []
        if events:
            with self.factory() as session:
                audit_trail.record_audit(session, events=events)

    async def run(self, period: float = 1.0) -> None:
        try:
            while True:
                await asyncio.sleep(period)
                try:
                    await run_in_threadpool(self.flush)
                except Exception as exc:  # the store is down: keep nothing, say so
                    log.warning("audit.flush_failed", error=str(exc)[:300])
        finally:
            with contextlib.suppress(Exception):
                self.flush()


async def get_audit(request: Request) -> AuditLog:
    return request.app.state.audit


AuditDep = Annotated[AuditLog, Depends(get_audit)]
