"""Completion webhooks: a plan's deliveries, and how this tenant's webhooks are signed."""

from __future__ import annotations

from fastapi import APIRouter

from service.auth.deps import ReaderDep
from service.core.deps import SessionDep, SettingsDep
from service.core.problems import ProblemException
from service.core.webhooks import SIGNATURE_HEADER, tenant_secret
from service.feed.plan_views import not_found
from service.schemas.plan import DeliveryOut, WebhookSecret
from service.store import deliveries, plans

router = APIRouter(tags=["webhooks"])


@router.get(
    "/v1/plans/{plan_id}/deliveries",
    response_model=list[DeliveryOut],
    summary="A plan's completion webhooks and their attempts",
    responses={404: {"description": "No such plan (problem details)"}},
)
def plan_deliveries(plan_id: str, principal: ReaderDep, session: SessionDep) -> list[DeliveryOut]:
    if plans.get_plan(session, plan_id=plan_id, tenant=principal.tenant_filter) is None:
        raise not_found(plan_id)
    return [
        DeliveryOut.model_validate(d, from_attributes=True)
        for d in deliveries.of_plan(session, plan_id=plan_id)
        if principal.tenant_filter is None or d.tenant == principal.tenant_filter
    ]


@router.get(
    "/v1/webhooks/secret",
    response_model=WebhookSecret,
    summary="This tenant's webhook signing secret",
    responses={
        404: {"description": "Webhooks are off: no TRAINPLAN_WEBHOOK_SECRET (problem details)"}
    },
)
def webhook_secret(principal: ReaderDep, settings: SettingsDep) -> WebhookSecret:
    if settings.webhook_secret is None:
        raise ProblemException(
            404, "webhooks-off", "Webhooks are off", "the operator sets TRAINPLAN_WEBHOOK_SECRET"
        )
    return WebhookSecret(
        secret=tenant_secret(settings.webhook_secret, principal.tenant), header=SIGNATURE_HEADER
    )
