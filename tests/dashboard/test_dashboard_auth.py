"""The dashboard's server side (issue 12), without a browser: pages and docs come from the
package, sign-in turns a key into an HttpOnly SameSite cookie the API accepts, changes made with
that cookie need the CSRF header, and the key never reaches a page or a log line. The browser
drives the same flows in tests/dashboard/test_dashboard.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.dashboard.assets import STATIC_DIR
from service.store import keys

PLAN = "00000000-0000-4000-8000-000000000000"
PAGES = ["/", f"/plans/{PLAN}", "/plans/new", "/gpus"]


@pytest.fixture
def open_app(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/p.db", embedded_worker=False)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def keyed(db_url: str) -> Iterator[TestClient]:
    settings = Settings(
        database_url=db_url, embedded_worker=False, auth_mode="keys", key_cache_seconds=0
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        yield client


def _key(
    client: TestClient, tenant: str = "acme", scopes: tuple[str, ...] = ("submit", "read")
) -> str:
    with client.app.state.session_factory() as s:  # type: ignore[attr-defined]
        return keys.issue_key(s, tenant=tenant, scopes=list(scopes))[0]


def _sign_in(client: TestClient, key: str, next_: str = "/") -> Any:
    client.get("/sign-in")  # sets the CSRF cookie
    csrf = client.cookies["trainplan_csrf"]
    return client.post(
        "/sign-in",
        data={"key": key, "csrf": csrf, "next": next_},
        follow_redirects=False,
    )


def test_pages_and_docs_load_only_packaged_assets(open_app: TestClient) -> None:
    for path in [*PAGES, "/docs", "/redoc"]:
        page = open_app.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assets = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
        assert assets, path
        for url in assets:
            assert url.startswith("/"), (path, url)  # nothing from another host
            assert open_app.get(url).status_code == 200, (path, url)
        # FastAPI's own docs pages name a CDN in a script: not these
        assert "cdn.jsdelivr.net" not in page.text and "fonts.googleapis" not in page.text
    for library in ("swagger-ui-5.35.0", "redoc-2.5.4", "chart.js-4.6.1"):
        folder = STATIC_DIR / "vendor" / library
        assert any(p.name.startswith("LICENSE") for p in folder.iterdir()), library
        assert library in (STATIC_DIR / "vendor" / "README.md").read_text()


def test_signed_out_pages_send_the_visitor_to_sign_in(keyed: TestClient) -> None:
    for path in PAGES:
        page = keyed.get(path, follow_redirects=False)
        assert page.status_code == 303
        assert page.headers["location"].startswith("/sign-in?next=")
    assert keyed.get("/v1/plans").status_code == 401
    assert keyed.get("/sign-in").status_code == 200


def test_sign_in_sets_an_httponly_strict_cookie_the_api_accepts(
    keyed: TestClient, small_spec: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    key = _key(keyed)
    answer = _sign_in(keyed, key, "/plans/new")
    assert answer.status_code == 303 and answer.headers["location"] == "/plans/new"
    cookie = next(
        c for c in answer.headers.get_list("set-cookie") if c.startswith("trainplan_session=")
    )
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=" in cookie
    page = keyed.get("/plans/new")
    assert page.status_code == 200 and "acme" in page.text
    assert key not in page.text  # the page's script never sees the key
    assert keyed.get("/v1/plans").status_code == 200  # the cookie alone reads
    # a change made with the cookie must echo the CSRF cookie (another site cannot read it)
    refused = keyed.post("/v1/plans", json=small_spec)
    assert refused.status_code == 403 and refused.json()["type"].endswith("csrf")
    csrf = {"X-CSRF-Token": keyed.cookies["trainplan_csrf"]}
    assert keyed.post("/v1/plans", json=small_spec, headers=csrf).status_code == 202
    # a Bearer client has no cookie to be tricked with: no CSRF header needed
    bearer = TestClient(keyed.app, base_url="http://127.0.0.1")
    spec = small_spec | {"training": small_spec["training"] | {"epochs": 2}}
    assert (
        bearer.post("/v1/plans", json=spec, headers={"Authorization": f"Bearer {key}"}).status_code
        == 202
    )
    assert key not in capsys.readouterr().out  # nor does any log line


def test_sign_in_refuses_a_bad_key_a_missing_csrf_and_a_foreign_next(keyed: TestClient) -> None:
    key = _key(keyed)
    wrong = _sign_in(keyed, "tp_not-a-key")
    assert wrong.status_code == 401 and "not valid" in wrong.text
    assert "trainplan_session" not in wrong.headers.get("set-cookie", "")
    forged = keyed.post("/sign-in", data={"key": key, "csrf": "guess", "next": "/"})
    assert forged.status_code == 403
    reader_only = _key(keyed, scopes=("submit",))
    assert _sign_in(keyed, reader_only).status_code == 401  # the dashboard needs 'read'
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        assert _sign_in(keyed, key, target).headers["location"] == "/"  # no open redirect


def test_sign_out_ends_the_session(keyed: TestClient) -> None:
    _sign_in(keyed, _key(keyed))
    assert keyed.get("/v1/plans").status_code == 200
    assert keyed.post("/sign-out", data={"csrf": "wrong"}).status_code == 403
    out = keyed.post(
        "/sign-out", data={"csrf": keyed.cookies["trainplan_csrf"]}, follow_redirects=False
    )
    assert out.status_code == 303 and out.headers["location"] == "/sign-in"
    keyed.cookies.delete("trainplan_session")  # what the browser does with the expired cookie
    assert keyed.get("/v1/plans").status_code == 401


def test_a_tenants_cookie_sees_only_its_plans(
    keyed: TestClient, small_spec: dict[str, Any]
) -> None:
    theirs = keyed.post(
        "/v1/plans", json=small_spec, headers={"Authorization": f"Bearer {_key(keyed, 'globex')}"}
    ).json()["id"]
    _sign_in(keyed, _key(keyed, "acme"))
    assert keyed.get(f"/v1/plans/{theirs}").status_code == 404
    assert keyed.get("/v1/plans").json()["items"] == []
