"""The sender of completion webhooks: a worker-side loop over the store's due deliveries.

Workers send them, not the API: a delivery's state is in the store from the submit on, so an
API restart loses none and a worker restart only delays one (its lease lapses and another
sender, or the same one restarted, claims it again: at least once; the `Trainplan-Delivery`
header lets a receiver drop duplicates). Each attempt re-checks the target (SSRF), never
follows a redirect, and counts only a 2xx as delivered; failures retry after a doubling delay
(from `webhook_backoff_seconds`, at most 10 minutes) until the plan ended
`webhook_max_age_seconds` ago.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import httpx
import structlog
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.core.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    RefusedTarget,
    check_target,
    sign,
    tenant_secret,
)
from service.store import deliveries
from service.store.common import aware, now
from service.store.models import Delivery, Plan

log = structlog.get_logger("trainplan.webhooks")
MAX_BACKOFF_S = 600.0


class WebhookSender:
    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        client: httpx.Client | None = None,
    ) -> None:
        if settings.webhook_secret is None:
            raise ValueError("webhooks are off: TRAINPLAN_WEBHOOK_SECRET is not set")
        self.settings = settings
        self.secret: str = settings.webhook_secret
        self.factory = factory
        self.client = client or httpx.Client(
            timeout=settings.webhook_timeout_seconds, follow_redirects=False
        )

    def run(self, stop: threading.Event) -> None:
        """Send what is due every `webhook_poll_seconds` until `stop` is set."""
        while not stop.wait(self.settings.webhook_poll_seconds):
            try:
                self.send_due()
            except Exception as exc:  # the store may be away for a while: try again later
                log.warning("webhooks.poll_failed", error=str(exc)[:300])

    def send_due(self) -> int:
        """Send every delivery due now; returns how many were attempted."""
        lease = 2 * self.settings.webhook_timeout_seconds + 5
        with self.factory() as session:
            claimed = deliveries.claim_due(session, lease_seconds=lease)
            for delivery, plan in claimed:
                self._attempt(session, delivery, plan)
        return len(claimed)

    def _attempt(self, session: Session, delivery: Delivery, plan: Plan) -> None:
        body = json.dumps(payload(delivery, plan), sort_keys=True).encode()
        status: int | None = None
        try:
            check_target(delivery.url, allow_private=self.settings.webhook_allow_private)
            response = self.client.post(
                delivery.url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "trainplan-webhooks",
                    SIGNATURE_HEADER: sign(tenant_secret(self.secret, delivery.tenant), body),
                    DELIVERY_HEADER: delivery.id,
                },
            )
            status = response.status_code
            error = None if response.is_success else f"HTTP {status}"
        except (RefusedTarget, httpx.HTTPError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        delivered = error is None
        retry_in = None if delivered else self._retry_in(delivery, plan)
        deliveries.record_attempt(
            session,
            delivery_id=delivery.id,
            delivered=delivered,
            status=status,
            error=error,
            retry_in=retry_in,
        )
        log.info(
            "webhooks.attempt",
            delivery=delivery.id,
            plan=plan.id,
            delivered=delivered,
            status=status,
            error=error,
        )

    def _retry_in(self, delivery: Delivery, plan: Plan) -> float | None:
        """The next attempt's delay, or None past the plan's age limit."""
        ended = aware(plan.finished_at) or now()
        if now() - ended > timedelta(seconds=self.settings.webhook_max_age_seconds):
            return None
        delay = self.settings.webhook_backoff_seconds * 2**delivery.attempts
        return min(delay, MAX_BACKOFF_S)


def payload(delivery: Delivery, plan: Plan) -> dict[str, Any]:
    """What a receiver gets: the plan's end and the numbers a scheduler launches with."""
    result = plan.result or {}
    throughput = result.get("throughput") or {}
    ended = aware(plan.finished_at)
    return {
        "event": "plan.finished",
        "delivery_id": delivery.id,
        "plan_id": plan.id,
        "status": plan.status,
        "finished_at": ended.isoformat() if ended else None,
        "href": f"/v1/plans/{plan.id}",
        "summary": {
            key: result.get(key)
            for key in (
                "feasible",
                "max_micro_batch_size",
                "micro_batch_size",
                "accumulation_steps",
                "global_batch_size",
                "learning_rate",
                "world_size",
                "strategy",
            )
        }
        | {
            "samples_per_second": throughput.get("samples_per_second"),
            "total_time_s": throughput.get("total_time_s"),
            "peak_bytes": (result.get("memory") or {}).get("peak"),
        }
        if plan.result
        else None,
        "error": {k: (plan.error or {}).get(k) for k in ("type", "title", "detail", "status")}
        if plan.error
        else None,
    }
