"""The dashboard's pages: shells that the page's script fills from the JSON API (the same
routes, tenancy and checks as any client), so the pages add no second way to read a plan."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from service.core.deps import SettingsDep
from service.dashboard.session import to_sign_in, viewer
from service.dashboard.templating import render
from service.schemas.examples import PLAN_EXAMPLES

router = APIRouter(include_in_schema=False)
PLAN_ID = re.compile(r"^[0-9a-f-]{36}$")


async def _page(
    request: Request, settings: SettingsDep, template: str, **context: object
) -> Response:
    principal = await viewer(request, settings)
    if principal is None:
        return to_sign_in(request)
    tenant = principal.tenant if settings.auth_mode == "keys" else None
    return render(request, template, tenant=tenant, signed_in=True, **context)


@router.get("/")
async def plans_page(request: Request, settings: SettingsDep) -> Response:
    return await _page(request, settings, "plans.html", page="plans")


@router.get("/plans")
async def plans_redirect() -> Response:
    return RedirectResponse("/", status_code=308)


@router.get("/plans/new")
async def new_plan_page(request: Request, settings: SettingsDep) -> Response:
    examples = {name: example["value"] for name, example in PLAN_EXAMPLES.items()}  # tojson
    summaries = {name: example.get("summary", name) for name, example in PLAN_EXAMPLES.items()}
    return await _page(
        request,
        settings,
        "new.html",
        page="new",
        examples=examples,
        summaries=summaries,
    )


@router.get("/plans/{plan_id}")
async def plan_page(request: Request, settings: SettingsDep, plan_id: str) -> Response:
    if not PLAN_ID.match(plan_id):
        return Response("no such plan", status_code=404)
    return await _page(request, settings, "plan.html", page="plan", plan_id=plan_id)


@router.get("/gpus")
async def gpus_page(request: Request, settings: SettingsDep) -> Response:
    return await _page(request, settings, "gpus.html", page="gpus")
