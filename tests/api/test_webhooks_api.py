"""`callback_url` at submit: refused targets are 422s naming it, an accepted one is a waiting
delivery the plan lists, the spec's identity ignores it, and the tenant can read its secret."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.core.webhooks import tenant_secret

SECRET = "operator-secret-for-tests"


@pytest.fixture
def hooked(db_url: str) -> Iterator[TestClient]:
    """The API with webhooks on, private targets refused (the default)."""
    settings = Settings(database_url=db_url, embedded_worker=False, webhook_secret=SECRET)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://example.com/hook", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://127.0.0.1:8000/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://[::1]/hook", "loopback"),
        ("http://user:pw@example.com/hook", "credentials"),
    ],
)
def test_a_refused_target_is_a_422_naming_callback_url(
    hooked: TestClient, small_spec: dict[str, Any], url: str, words: str
) -> None:
    response = hooked.post("/v1/plans", json=small_spec | {"callback_url": url})
    assert response.status_code == 422, response.text
    error = response.json()["errors"][0]
    assert error["field"] == "callback_url"
    assert words in error["msg"]
    assert hooked.get("/v1/plans").json()["items"] == []  # nothing was queued


def test_without_a_secret_a_callback_is_refused(
    client: TestClient, small_spec: dict[str, Any]
) -> None:
    response = client.post("/v1/plans", json=small_spec | {"callback_url": "https://a.example/h"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "callback_url"
    assert "webhooks are off" in response.json()["errors"][0]["msg"]


def test_an_accepted_callback_waits_for_the_plan_and_does_not_change_its_identity(
    db_url: str, small_spec: dict[str, Any]
) -> None:
    settings = Settings(
        database_url=db_url,
        embedded_worker=False,
        webhook_secret=SECRET,
        webhook_allow_private=True,
    )
    with TestClient(create_app(settings)) as client:
        hook = "http://127.0.0.1:9/hook"
        first = client.post("/v1/plans", json=small_spec | {"callback_url": hook})
        assert first.status_code == 202, first.text
        plan_id = first.json()["id"]
        # the same spec without a callback, and again with it: the same plan, one delivery
        assert client.post("/v1/plans", json=small_spec).json()["id"] == plan_id
        again = client.post("/v1/plans", json=small_spec | {"callback_url": hook})
        assert again.json()["id"] == plan_id
        listed = client.get(f"/v1/plans/{plan_id}/deliveries").json()
        assert [(d["url"], d["state"], d["attempts"]) for d in listed] == [(hook, "waiting", 0)]
        assert "callback_url" not in client.get(f"/v1/plans/{plan_id}").json()["spec"]
        secret = client.get("/v1/webhooks/secret").json()
        assert secret["secret"] == tenant_secret(SECRET, "default")
        assert secret["header"] == "Trainplan-Signature"
        assert client.get("/v1/plans/nope/deliveries").status_code == 404
