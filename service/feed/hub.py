"""The change feed of one API process: every long poll and SSE stream on a plan follows one shared
`Followed` entry, which reads the store once per change of that plan (not once per client per
tick), so the database's load grows with the number of changes, never with the number of
clients. What tells it a plan changed is a `source` (service/feed/sources.py): PostgreSQL's
LISTEN/NOTIFY, or one poller for the whole process on SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from service.core.problems import ProblemException
from service.feed.plan_views import plan_body
from service.schemas.plan import PlanStatus
from service.schemas.result import Trial
from service.store import plans

log = structlog.get_logger("trainplan.feed")


@dataclass
class PlanState:
    """What a follower of a plan is told: its status, the current attempt's trials so far and,
    once it has ended, its stored response."""

    status: PlanStatus
    attempts: int
    cancel_requested: bool
    error: dict[str, Any] | None
    max_micro_batch_size: int | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    final_body: bytes | None = None

    @property
    def final(self) -> bool:
        return self.status.final

    @property
    def last_index(self) -> int:
        return int(self.trials[-1]["index"]) if self.trials else -1

    @property
    def signature(self) -> tuple[Any, ...]:
        """Comparable with `plans.signatures`: differs as soon as the plan has changed."""
        last = self.last_index if self.trials else None
        return (self.status, self.attempts, self.cancel_requested, last)


def _load(
    factory: sessionmaker[Session], plan_id: str, known: PlanState | None
) -> PlanState | None:
    """The plan's state now, reading only the trials that `known` lacks (None: it is gone)."""
    with factory() as session:
        row = plans.follow(session, plan_id=plan_id)
        if row is None:
            return None
        status, attempts, cancel_requested, error, answer = row
        same_attempt = known is not None and known.attempts == attempts
        after = known.last_index if known is not None and same_attempt else -1
        new = [
            Trial.model_validate(t).model_dump(mode="json")
            | {"index": t.index, "attempt": attempts}
            for t in plans.trials_of(session, plan_id=plan_id, attempt=attempts, after_index=after)
        ]
    state = PlanState(PlanStatus(status), attempts, bool(cancel_requested), error, answer)
    state.trials = (known.trials if known is not None and same_attempt else []) + new
    if state.final:
        state.final_body = plan_body(plan_id, factory).body
    return state


class Followed:
    """One plan as this process follows it: its latest state, how many clients wait on it, and
    a condition they wait on. Reloads are coalesced: changes that arrive during a load cause one
    more load, not one each."""

    def __init__(self, plan_id: str) -> None:
        self.plan_id = plan_id
        self.state: PlanState | None = None
        self.version = 0
        self.watchers = 0
        self.loaded = asyncio.Event()
        self.unavailable: str | None = None  # why the first load failed
        self.changed = asyncio.Condition()
        self._loading = False
        self._dirty = False

    async def refresh(self, factory: sessionmaker[Session]) -> None:
        if self._loading:
            self._dirty = True
            return
        self._loading = True
        try:
            while True:
                self._dirty = False
                try:
                    state = await run_in_threadpool(_load, factory, self.plan_id, self.state)
                except Exception as exc:  # the store is down: followers keep what they have
                    log.warning("feed.load_failed", plan_id=self.plan_id, error=str(exc)[:300])
                    if not self.loaded.is_set():
                        self.unavailable = str(exc).splitlines()[0][:200]
                        self.loaded.set()
                    return
                if state != self.state or not self.loaded.is_set():
                    self.state = state
                    self.version += 1
                    self.loaded.set()
                    async with self.changed:
                        self.changed.notify_all()
                if not self._dirty:
                    return
        finally:
            self._loading = False

    async def wait(self, version: int, timeout: float) -> bool:
        """Until the state moves past `version` (True) or `timeout` seconds pass (False)."""
        async with self.changed:
            with suppress(TimeoutError):
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.version > version), timeout
                )
        return self.version > version

    async def wait_until(
        self, done: Callable[[PlanState | None], bool], timeout: float
    ) -> PlanState | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(self.state) and (left := deadline - loop.time()) > 0:
            await self.wait(self.version, left)
        return self.state


class PlanFeed:
    """The process's followed plans. `watch(plan_id)` joins (loading the plan if nobody follows
    it yet) and leaves on exit; `changed(ids)` is what a source calls."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.followed: dict[str, Followed] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def watch(self, plan_id: str) -> AsyncIterator[Followed]:
        entry = self.followed.get(plan_id)
        if entry is None:
            entry = self.followed[plan_id] = Followed(plan_id)
            self._spawn(entry.refresh(self.factory))
        entry.watchers += 1
        try:
            await entry.loaded.wait()
            if entry.unavailable is not None and entry.state is None:
                raise ProblemException(503, "unavailable", "Store unavailable", entry.unavailable)
            if entry.state is None:
                raise ProblemException(404, "not-found", "Not found", f"no plan {plan_id!r}")
            yield entry
        finally:
            entry.watchers -= 1
            if entry.watchers == 0 and self.followed.get(plan_id) is entry:
                del self.followed[plan_id]

    def watched(self) -> list[str]:
        return list(self.followed)

    def changed(self, plan_ids: Iterable[str]) -> None:
        for plan_id in plan_ids:
            entry = self.followed.get(plan_id)
            if entry is not None:
                self._spawn(entry.refresh(self.factory))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
