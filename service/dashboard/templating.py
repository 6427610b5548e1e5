"""Jinja2 templates (autoescaped) and the security headers every dashboard page carries."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from service.dashboard import assets

TEMPLATES = Jinja2Templates(directory=str(assets.TEMPLATES_DIR))

# Scripts and styles from this server only: no inline script can run, nothing is fetched from
# elsewhere, and no other site may frame the pages.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def render(request: Request, template: str, **context: Any) -> HTMLResponse:
    from service.dashboard.session import csrf_token

    settings = request.app.state.settings
    response = TEMPLATES.TemplateResponse(
        request,
        template,
        {
            "assets": assets,
            "csrf": csrf_token(request),
            "auth_on": settings.auth_mode != "none",
            **context,
        },
    )
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response
