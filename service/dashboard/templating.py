"""Jinja2 templates (autoescaped), and what every dashboard page carries: security headers and
the browser's CSRF value (set as a cookie on the first page it is shown)."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from service.auth.deps import CSRF_COOKIE
from service.dashboard import assets

TEMPLATES = Jinja2Templates(directory=str(assets.TEMPLATES_DIR))

# Scripts and styles from this server only: no inline script can run, nothing is fetched from
# elsewhere, and no other site may frame the pages.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def render(request: Request, template: str, **context: Any) -> HTMLResponse:
    settings = request.app.state.settings
    csrf = request.cookies.get(CSRF_COOKIE)
    new_csrf = None if csrf else secrets.token_urlsafe(32)
    response = TEMPLATES.TemplateResponse(
        request,
        template,
        {
            "assets": assets,
            "csrf": csrf or new_csrf,
            "auth_on": settings.auth_mode != "none",
            **context,
        },
    )
    if new_csrf:
        # Readable by the page's script (it echoes it); SameSite keeps other sites from sending it.
        response.set_cookie(
            CSRF_COOKIE,
            new_csrf,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
            httponly=False,
        )
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response
