"""Signing in to the dashboard: an API key (or token) posted once from a form becomes an
HttpOnly, SameSite=Strict cookie that the API accepts beside the Bearer header (`auth.deps`).
The key never reaches the page's script or the logs; the CSRF cookie is a random value the page
echoes in a header or form field (double submit)."""

from __future__ import annotations

import secrets
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse

from service.api.deps import SettingsDep
from service.auth.deps import CSRF_COOKIE, SESSION_COOKIE, principal_of
from service.auth.principal import Principal
from service.config import Settings
from service.dashboard.templating import render

router = APIRouter(include_in_schema=False)
SESSION_SECONDS = 8 * 3600


def auth_on(settings: Settings) -> bool:
    return settings.auth_mode != "none"


async def viewer(request: Request, settings: Settings) -> Principal | None:
    """The signed-in principal of a page request (everyone when auth is off)."""
    return await principal_of(request, settings, request.cookies.get(SESSION_COOKIE, ""))


def csrf_token(request: Request) -> str:
    """The browser's CSRF value: its cookie's, or a new one (set by `keep_csrf`)."""
    token = request.cookies.get(CSRF_COOKIE) or getattr(request.state, "new_csrf", None)
    if not token:
        token = request.state.new_csrf = secrets.token_urlsafe(32)
    return token


def keep_csrf(request: Request, response: Response) -> Response:
    new = getattr(request.state, "new_csrf", None)
    if new:
        # Readable by the page's script (it echoes it); SameSite keeps other sites from sending it.
        response.set_cookie(
            CSRF_COOKIE, new, samesite="strict", secure=_https(request), path="/", httponly=False
        )
    return response


def to_sign_in(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/sign-in?next={quote(target, safe='')}", status_code=303)


def _https(request: Request) -> bool:
    return request.url.scheme == "https"


def _local_path(target: str) -> str:
    """Only a path on this server (no `//host` or scheme): no open redirect."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


@router.get("/sign-in")
async def sign_in_page(request: Request, settings: SettingsDep, next: str = "/") -> Response:
    if not auth_on(settings):
        return RedirectResponse(_local_path(next), status_code=303)
    return keep_csrf(
        request, render(request, "sign_in.html", next=_local_path(next), error=None, tenant=None)
    )


@router.post("/sign-in")
async def sign_in(
    request: Request,
    settings: SettingsDep,
    key: Annotated[str, Form(max_length=512)] = "",
    csrf: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    target = _local_path(next)
    expected = request.cookies.get(CSRF_COOKIE, "")
    if not expected or not secrets.compare_digest(expected, csrf):
        return _refused(request, target, "The form expired: sign in again.", 403)
    principal = await principal_of(request, settings, key.strip())
    if principal is None or "read" not in principal.scopes:
        return _refused(request, target, "That key is not valid here (or lacks 'read').", 401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        key.strip(),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=_https(request),
        path="/",
    )
    return response


def _refused(request: Request, target: str, message: str, status: int) -> Response:
    page = render(request, "sign_in.html", next=target, error=message, tenant=None)
    page.status_code = status
    return keep_csrf(request, page)


@router.post("/sign-out")
async def sign_out(request: Request, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    expected = request.cookies.get(CSRF_COOKIE, "")
    if not expected or not secrets.compare_digest(expected, csrf):
        return Response("CSRF check failed", status_code=403)
    response = RedirectResponse("/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
