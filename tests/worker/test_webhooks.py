"""Completion webhooks, sent by the worker side from the store: delivery, signature, retry after
a receiver failure, no redirects, giving up, and a restart between a plan's end and the send."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from service.config import Settings
from service.core.webhooks import SIGNATURE_HEADER, tenant_secret, verify
from service.store import deliveries, plans
from service.store.db import make_engine, make_session_factory, upgrade
from service.store.models import Delivery
from tests.helpers import enqueue
from workers.loop import PlanWorker
from workers.webhooks import WebhookSender

SECRET = "operator-secret-for-tests"


class Receiver:
    """A local HTTP endpoint that records each POST and answers with the next planned status."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[tuple[int, dict[str, str]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server calls it by this name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                status, headers = receiver.answers.pop(0) if receiver.answers else (200, {})
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def _settings(db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "webhook_secret": SECRET,
        "webhook_allow_private": True,  # the receiver is on loopback
        "webhook_backoff_seconds": 0.001,
        "poll_seconds": 0.1,
    }
    return Settings(**(values | overrides))


def _factory(db_url: str) -> Any:
    """A fresh engine and session factory: what a restarted process opens."""
    return make_session_factory(make_engine(db_url))


def _delivery(factory: Any, delivery_id: str) -> Delivery:
    with factory() as s:
        found = s.get(Delivery, delivery_id)
        assert found is not None
        return found


def _subscribed(
    db_url: str, spec: dict[str, Any], url: str, cancel: bool = False
) -> tuple[Any, str, str]:
    """A fresh store with one queued plan (cancelled at once, if asked) whose end is to be
    delivered to `url`: (its session factory, the plan's id, the delivery's id)."""
    upgrade(db_url)
    factory = _factory(db_url)
    plan_id = enqueue(factory, spec)
    with factory() as s:
        delivery_id = deliveries.subscribe(s, plan_id=plan_id, tenant="default", url=url).id
        if cancel:
            plans.request_cancel(s, plan_id=plan_id)
    return factory, plan_id, delivery_id


def test_a_finished_plan_is_delivered_signed_after_a_restart_and_a_receiver_failure(
    db_url: str, small_spec: dict[str, Any], receiver: Receiver
) -> None:
    settings = _settings(db_url)
    factory, plan_id, delivery_id = _subscribed(db_url, small_spec, receiver.url)
    # nothing is due while the plan waits
    assert WebhookSender(settings, factory).send_due() == 0
    assert PlanWorker(settings, factory, "w-hooks").run_once() == 1
    # the API and the worker restart here: a new process's sender finds the delivery in the store
    receiver.answers = [(500, {})]
    sender = WebhookSender(settings, _factory(db_url))
    assert sender.send_due() == 1
    failed = _delivery(factory, delivery_id)
    assert (failed.state, failed.attempts, failed.last_status) == ("retrying", 1, 500)
    assert failed.next_attempt_at is not None
    while _delivery(factory, delivery_id).state == "retrying":  # the backoff is 1 ms here
        sender.send_due()
    done = _delivery(factory, delivery_id)
    assert (done.state, done.attempts, done.last_status) == ("delivered", 2, 200)
    assert len(receiver.received) == 2
    headers, body = receiver.received[-1]
    assert verify(tenant_secret(SECRET, "default"), body, headers[SIGNATURE_HEADER])
    assert not verify(tenant_secret(SECRET, "another"), body, headers[SIGNATURE_HEADER])
    assert not verify(tenant_secret(SECRET, "default"), body + b" ", headers[SIGNATURE_HEADER])
    sent = json.loads(body)
    with factory() as s:
        plan = plans.get_plan(s, plan_id=plan_id)
        assert plan is not None and plan.result is not None
        expected = plan.result["max_micro_batch_size"]
    assert (sent["plan_id"], sent["status"], sent["event"]) == (
        plan_id,
        "succeeded",
        "plan.finished",
    )
    assert sent["summary"]["max_micro_batch_size"] == expected
    assert headers["Trainplan-Delivery"] == delivery_id
    assert sender.send_due() == 0  # delivered once


def test_a_cancelled_plan_is_delivered_and_a_redirect_is_not_followed(
    db_url: str, small_spec: dict[str, Any], receiver: Receiver
) -> None:
    settings = _settings(db_url)
    factory, _, delivery_id = _subscribed(db_url, small_spec, receiver.url, cancel=True)
    receiver.answers = [(302, {"Location": "http://169.254.169.254/latest/meta-data"})]
    sender = WebhookSender(settings, factory)
    assert sender.send_due() == 1
    redirected = _delivery(factory, delivery_id)
    assert (redirected.state, redirected.last_status) == ("retrying", 302)
    assert len(receiver.received) == 1  # the redirect was not followed
    while _delivery(factory, delivery_id).state == "retrying":
        sender.send_due()
    assert json.loads(receiver.received[-1][1])["status"] == "cancelled"


def test_a_delivery_gives_up_past_the_age_limit_and_refuses_a_private_target(
    db_url: str, small_spec: dict[str, Any]
) -> None:
    target = "http://127.0.0.1:9/hook"
    factory, _, delivery_id = _subscribed(db_url, small_spec, target, cancel=True)
    # private targets refused at send time too; the plan ended longer ago than allowed
    sender = WebhookSender(
        _settings(db_url, webhook_allow_private=False, webhook_max_age_seconds=1e-6), factory
    )
    assert sender.send_due() == 1
    gave_up = _delivery(factory, delivery_id)
    assert gave_up.state == "failed" and gave_up.last_error is not None
    assert "RefusedTarget" in gave_up.last_error and gave_up.last_status is None
