"""The auth dependencies: `authenticate` turns the credential into a `Principal`, and
`require(scope)` guards a route. `TRAINPLAN_AUTH_MODE`: `none` (loopback: one tenant, every
scope), `token` (the legacy shared tokens: the same), `keys` (API keys per tenant).

The credential is the `Authorization: Bearer` header; or HTTP Basic with the key as the
password, for clients that can only put a credential in a URL (SkyPilot's RestfulAdminPolicy
sends no header of its own: `https://x:<key>@host/...` makes `requests` send Basic); or, for the
dashboard, its HttpOnly session cookie (which `EventSource` sends, where it cannot set a
header). A request that rides on the cookie and changes something must also echo the CSRF
cookie in `X-CSRF-Token` (double submit): another site's form can make the browser send the
cookie, but cannot read the CSRF one."""

from __future__ import annotations

import base64
import binascii
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.core.deps import SettingsDep
from service.core.principal import EVERYONE, Principal, key_hash
from service.core.problems import ProblemException
from service.store import keys

BEARER = HTTPBearer(auto_error=False, description="An API key (`trainplan keys create`).")


class KeyRing:
    """Resolves keys to principals, keeping each answer `ttl` seconds so a GET does not pay a
    query for its key (a revoked key stops working within `ttl`). `last_used_at` is written at
    most once a minute per key."""

    def __init__(self, factory: sessionmaker[Session], ttl: float = 5.0) -> None:
        self.factory, self.ttl = factory, ttl
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def cached(self, hashed: str) -> tuple[bool, Principal | None]:
        hit = self._cache.get(hashed)
        if hit is not None and hit[1] > time.monotonic():
            return True, hit[0]
        return False, None

    def resolve(self, hashed: str) -> Principal | None:
        with self.factory() as session:
            row = keys.find_key(session, hashed=hashed)
            principal = None
            if row is not None:
                principal = Principal(row.tenant, frozenset(row.scopes.split(",")), row.id)
                if time.monotonic() - self._touched.get(row.id, -1e9) > 60:
                    keys.touch_key(session, key_id=row.id)
                    self._touched[row.id] = time.monotonic()
        with self._lock:
            if len(self._cache) > 10_000:  # bounded: unknown keys are cached too
                self._cache.clear()
            self._cache[hashed] = (principal, time.monotonic() + self.ttl)
        return principal


SESSION_COOKIE = "trainplan_session"
CSRF_COOKIE = "trainplan_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _unauthorized(sent: bool) -> ProblemException:
    """RFC 9110 15.5.2: a 401 names the scheme in WWW-Authenticate (RFC 6750 for Bearer)."""
    challenge = 'Bearer realm="trainplan"'
    if sent:
        challenge += ', error="invalid_token"'
    return ProblemException(
        401,
        "unauthorized",
        "Unauthorized",
        "send 'Authorization: Bearer <key>'" + (": this one is not a live key" if sent else ""),
    ).with_headers({"WWW-Authenticate": challenge})


async def principal_of(request: Request, settings: Settings, token: str) -> Principal | None:
    """Who `token` is (None: nobody)."""
    if settings.auth_mode == "none":
        return EVERYONE
    if not token:
        return None
    if settings.auth_mode == "token":
        ok = any(secrets.compare_digest(token, t) for t in settings.api_tokens)
        return EVERYONE if ok else None
    keys: KeyRing = request.app.state.keyring
    hashed = key_hash(token)
    hit, principal = keys.cached(hashed)
    if not hit:
        principal = await run_in_threadpool(keys.resolve, hashed)
    return principal


def basic_password(request: Request) -> str:
    """The password of an `Authorization: Basic` header ("" for none or a malformed one)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2].strip()


def csrf_ok(request: Request, sent: str | None = None) -> bool:
    """The CSRF cookie echoed: in `X-CSRF-Token`, or as `sent` (a form's field)."""
    expected = request.cookies.get(CSRF_COOKIE, "")
    echoed = request.headers.get(CSRF_HEADER, "") if sent is None else sent
    return bool(expected) and secrets.compare_digest(expected, echoed)


async def authenticate(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Principal:
    if settings.auth_mode == "none":
        return EVERYONE
    token = credentials.credentials.strip() if credentials is not None else ""
    token = token or basic_password(request)
    via_cookie = not token
    if via_cookie:
        token = request.cookies.get(SESSION_COOKIE, "")
    principal = await principal_of(request, settings, token)
    if principal is None:
        raise _unauthorized(sent=bool(token))
    if via_cookie and request.method not in SAFE_METHODS and not csrf_ok(request):
        raise ProblemException(
            403,
            "csrf",
            "CSRF check failed",
            f"a request signed in by the dashboard's cookie must send {CSRF_HEADER}",
        )
    return principal


def require(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    async def scoped(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if scope not in principal.scopes:
            raise ProblemException(
                403, "forbidden", "Forbidden", f"this key lacks the {scope!r} scope"
            )
        return principal

    scoped.__name__ = f"require_{scope}"
    return scoped


ReaderDep = Annotated[Principal, Depends(require("read"))]
SubmitterDep = Annotated[Principal, Depends(require("submit"))]
AdminDep = Annotated[Principal, Depends(require("admin"))]
