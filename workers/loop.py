"""The worker loop: claim the oldest plan, run it in a child process, stream its trials into the
store, keep the lease alive with a heartbeat, honour cancel and the time limit, record the end.

A plan whose worker dies is claimed again once its lease runs out (up to `max_attempts`), so no
plan is lost; `finish` only succeeds for the worker still holding the plan, so none ends twice.
"""

from __future__ import annotations

import json
import os
import queue as queue_mod
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
import torch
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.schemas.plan import PlanStatus
from service.schemas.problem import problem
from service.schemas.result import PlanResult
from service.store import claims, plans, registry
from service.store.db import session_scope
from workers import engine
from workers.metrics import PLAN_SECONDS, PLANS_FINISHED, TRIALS
from workers.runner import start_child
from workers.webhooks import WebhookSender

log = structlog.get_logger("trainplan.worker")
T = TypeVar("T")
# What a database restart, a dropped connection or a full disk raise: worth waiting out.
TRANSIENT = (OperationalError, InterfaceError)


def device_kinds() -> tuple[str, ...]:
    """What this worker can run: simulated and cpu always, cuda when a GPU is visible."""
    kinds = ["simulated", "cpu"]
    if torch.cuda.is_available():
        kinds.append("cuda")
    return tuple(kinds)


@dataclass
class _Run:
    """One attempt at one plan, as the worker follows it: trials are numbered in arrival order."""

    plan_id: str
    attempt: int
    started: float
    spec_hash: str | None = None
    trials: int = 0


class PlanWorker:
    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        worker_id: str | None = None,
        kinds: tuple[str, ...] | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.kinds = kinds or device_kinds()
        self.current_plan: str | None = None  # what the heartbeat reports

    # -- loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event, max_plans: int | None = None) -> int:
        """Work until `stop` is set (or `max_plans` are done); returns plans handled."""
        with session_scope(self.factory) as session:
            registry.register_worker(
                session,
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                devices={"kinds": list(self.kinds)},
            )
        done = 0
        finished = threading.Event()
        beating = threading.Thread(
            target=self._heartbeat, args=(finished,), daemon=True, name="trainplan-heartbeat"
        )
        beating.start()
        try:
            while not stop.is_set() and (max_plans is None or done < max_plans):
                try:
                    handled = self.run_once(stop)
                except Exception as exc:  # the database may be restarting: wait, then retry
                    log.warning("worker.loop_error", error=str(exc)[:500])
                    stop.wait(min(5.0, self.settings.poll_seconds * 4))
                    continue
                done += handled
                if not handled:
                    stop.wait(self.settings.poll_seconds)
        finally:
            finished.set()
            beating.join(timeout=5)
        self._beat(None, stopped=True)
        return done

    def _heartbeat(self, finished: threading.Event) -> None:
        """Beat on a thread of its own, so a worker busy with a plan (or starting the process
        it runs in) is still seen alive by `GET /v1/workers`."""
        while not finished.wait(self.settings.heartbeat_seconds):
            self._beat(self.current_plan)

    def run_once(self, stop: threading.Event | None = None) -> int:
        with self.factory() as session:
            claims.fail_exhausted(session, max_attempts=self.settings.max_attempts)
            plan = claims.claim_next(
                session,
                worker_id=self.worker_id,
                lease_seconds=self.settings.lease_seconds,
                device_kinds=self.kinds,
            )
            if plan is None:
                return 0
            plan_id, attempt, spec, spec_hash = plan.id, plan.attempts, plan.spec, plan.spec_hash
        log.info("plan.claimed", plan_id=plan_id, attempt=attempt, worker=self.worker_id)
        self.current_plan = plan_id
        self._beat(plan_id)
        try:
            self.execute(plan_id, attempt, spec, stop or threading.Event(), spec_hash)
        finally:
            self.current_plan = None
        self._beat(None, done=1)
        return 1

    def _beat(self, plan_id: str | None, done: int = 0, stopped: bool = False) -> None:
        try:
            with self.factory() as session:
                registry.worker_heartbeat(
                    session,
                    worker_id=self.worker_id,
                    current_plan=plan_id,
                    done_delta=done,
                    stopped=stopped,
                )
        except Exception as exc:
            log.warning("worker.heartbeat_failed", error=str(exc)[:300])
            return
        if self.settings.heartbeat_file is not None and not stopped:
            self.settings.heartbeat_file.touch()  # the container's health check reads its age

    # -- one plan --------------------------------------------------------------------------
    def execute(
        self,
        plan_id: str,
        attempt: int,
        spec: dict[str, Any],
        stop: threading.Event,
        spec_hash: str | None = None,
    ) -> str:
        """Run one claimed plan to its end; returns the final status written (or 'lost')."""
        settings = self.settings
        started = time.monotonic()
        deadline = started + settings.plan_timeout_seconds
        process, channel = start_child(
            json.dumps(spec), int(settings.plan_memory_limit_gib * 2**30)
        )
        next_beat = time.monotonic() + settings.heartbeat_seconds
        run = _Run(plan_id, attempt, started, spec_hash)
        try:
            while True:
                message = self._receive(channel, 0.2)
                if message is not None:
                    final = self._handle(run, message)
                    if final is not None:
                        return final
                    continue
                if not process.is_alive():
                    # The child is gone: what it left in the pipe still counts, in order.
                    while (message := self._receive(channel, 0.5)) is not None:
                        final = self._handle(run, message)
                        if final is not None:
                            return final
                    return self._end(
                        run,
                        PlanStatus.failed,
                        error=problem(
                            "plan-crashed",
                            "The plan's process died",
                            f"the child process exited with code {process.exitcode} "
                            f"(killed by the OS or a native crash)",
                            500,
                        ),
                    )
                now = time.monotonic()
                if now > deadline:
                    return self._end(
                        run,
                        PlanStatus.failed,
                        error=problem(
                            "plan-timeout",
                            "The plan exceeded its time limit",
                            f"stopped after {settings.plan_timeout_seconds:g} s "
                            f"(TRAINPLAN_PLAN_TIMEOUT_SECONDS)",
                            504,
                        ),
                    )
                if now > next_beat:
                    next_beat = now + settings.heartbeat_seconds
                    if not self._extend(plan_id):
                        log.warning("plan.lease_lost", plan_id=plan_id)
                        return "lost"
                    if self._cancelled(plan_id):
                        return self._end(run, PlanStatus.cancelled)
                if stop.is_set():
                    return "lost"  # shutting down: the lease runs out, another worker retries
        finally:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
            channel.close()

    def _receive(self, channel: Any, timeout: float) -> tuple[str, Any] | None:
        try:
            return channel.get(timeout=timeout)
        except (queue_mod.Empty, EOFError, OSError):
            return None

    def _handle(self, run: _Run, message: tuple[str, Any]) -> str | None:
        """Store a trial (None: go on) or record the end (the final status)."""
        kind, payload = message
        if kind == "trial":
            self._store_trial(run.plan_id, run.attempt, run.trials, payload)
            run.trials += 1
            return self._end(run, PlanStatus.cancelled) if self._cancelled(run.plan_id) else None
        if kind == "result":  # the child's result, typed again on this side of the queue
            return self._end(run, PlanStatus.succeeded, result=PlanResult.model_validate(payload))
        return self._end(run, PlanStatus.failed, error=payload)

    def _retrying(self, what: str, write: Callable[[Session], T]) -> T:
        """Run one store operation, waiting out a database that restarts or a disk that is full
        for as long as the lease lasts, so a short outage costs a pause instead of the plan.
        Past that, the error propagates: the plan's lease runs out and it is claimed again."""
        give_up = time.monotonic() + self.settings.lease_seconds
        delay = 0.1
        while True:
            try:
                with self.factory() as session:
                    return write(session)
            except TRANSIENT as exc:
                if time.monotonic() + delay > give_up:
                    raise
                log.warning("worker.store_retry", what=what, error=str(exc)[:300])
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _store_trial(self, plan_id: str, attempt: int, index: int, trial: dict[str, Any]) -> None:
        def write(session: Session) -> None:
            try:
                claims.add_trial(
                    session, plan_id=plan_id, attempt=attempt, index=index, trial=trial
                )
            except IntegrityError:  # a retry after a commit whose answer was lost: stored
                session.rollback()

        self._retrying("trial", write)
        TRIALS.labels(fits=str(bool(trial["fits"])).lower()).inc()

    def _cancelled(self, plan_id: str) -> bool:
        return self._retrying("cancel", lambda s: claims.is_cancel_requested(s, plan_id=plan_id))

    def _extend(self, plan_id: str) -> bool:
        lease = self.settings.lease_seconds
        return self._retrying(
            "lease",
            lambda s: claims.extend_lease(
                s, plan_id=plan_id, worker_id=self.worker_id, lease_seconds=lease
            ),
        )

    def _end(
        self,
        run: _Run,
        status: str,
        result: PlanResult | None = None,
        error: dict[str, Any] | None = None,
    ) -> str:
        """Record the end, stamped with the versions this worker ran the plan with."""
        plan_id = run.plan_id
        versions = engine.versions()
        made_with = plans.reuse_key(run.spec_hash, versions) if run.spec_hash else None
        if status == PlanStatus.cancelled:
            error = problem(
                "cancelled", "Plan cancelled", "cancelled on request; trials so far are kept", 409
            )
        ok = self._retrying(
            "finish",
            lambda s: claims.finish(
                s,
                plan_id=plan_id,
                worker_id=self.worker_id,
                status=status,
                result=result,
                error=error,
                versions=versions if made_with else None,
                made_with=made_with,
            ),
        )
        elapsed = time.monotonic() - run.started
        PLAN_SECONDS.observe(elapsed)
        PLANS_FINISHED.labels(status=status).inc()
        log.info(
            "plan.finished", plan_id=plan_id, status=status, seconds=round(elapsed, 3), recorded=ok
        )
        return status if ok else "lost"


def start_threads(
    settings: Settings, factory: sessionmaker[Session], stop: threading.Event
) -> list[threading.Thread]:
    """The embedded worker: `worker_concurrency` plan workers on threads of this process,
    working until `stop` is set."""
    threads = []
    if settings.webhook_secret is not None:
        threads.append(start_webhook_sender(settings, factory, stop))
    for _ in range(settings.worker_concurrency):
        worker = PlanWorker(settings, factory)
        thread = threading.Thread(
            target=worker.run, args=(stop,), daemon=True, name=f"worker-{worker.worker_id}"
        )
        thread.start()
        threads.append(thread)
    return threads


def start_webhook_sender(
    settings: Settings, factory: sessionmaker[Session], stop: threading.Event
) -> threading.Thread:
    """The completion webhooks' sender, on its own thread until `stop` is set."""
    sender = WebhookSender(settings, factory)
    thread = threading.Thread(target=sender.run, args=(stop,), daemon=True, name="webhooks")
    thread.start()
    return thread


def flush_webhooks(settings: Settings, factory: sessionmaker[Session]) -> None:
    """One pass over the due deliveries (a worker that stops after its last plan sends that
    plan's webhooks before it exits; any that fail stay in the store for the next sender)."""
    try:
        WebhookSender(settings, factory).send_due()
    except Exception as exc:
        log.warning("webhooks.flush_failed", error=str(exc)[:300])
