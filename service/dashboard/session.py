"""Signing in to the dashboard: an API key (or token) posted once from a form becomes an
HttpOnly, SameSite=Strict cookie that the API accepts beside the Bearer header (`auth.deps`).
The key never reaches the page's script or the logs; the CSRF cookie is a random value the page
echoes in a header or form field (double submit)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse

from service.auth.deps import SESSION_COOKIE, csrf_ok, principal_of
from service.config import Settings
from service.core.deps import SettingsDep
from service.core.principal import Principal
from service.dashboard.templating import render

router = APIRouter(include_in_schema=False)
SESSION_SECONDS = 8 * 3600


async def viewer(request: Request, settings: Settings) -> Principal | None:
    """The signed-in principal of a page request (everyone when auth is off)."""
    return await principal_of(request, settings, request.cookies.get(SESSION_COOKIE, ""))


def to_sign_in(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/sign-in?next={quote(target, safe='')}", status_code=303)


def _local_path(target: str) -> str:
    """Only a path on this server (no `//host` or scheme): no open redirect."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


@router.get("/sign-in")
async def sign_in_page(request: Request, settings: SettingsDep, next: str = "/") -> Response:
    if settings.auth_mode == "none":
        return RedirectResponse(_local_path(next), status_code=303)
    return render(request, "sign_in.html", next=_local_path(next), error=None, tenant=None)


@router.post("/sign-in")
async def sign_in(
    request: Request,
    settings: SettingsDep,
    key: Annotated[str, Form(max_length=512)] = "",
    csrf: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    target = _local_path(next)
    if not csrf_ok(request, csrf):
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
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


def _refused(request: Request, target: str, message: str, status: int) -> Response:
    page = render(request, "sign_in.html", next=target, error=message, tenant=None)
    page.status_code = status
    return page


@router.post("/sign-out")
async def sign_out(request: Request, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    if not csrf_ok(request, csrf):
        return Response("CSRF check failed", status_code=403)
    response = RedirectResponse("/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
