"""Submit quotas: a rate per key (a token bucket kept in the store, shared by API processes)
and a cap on a tenant's queued + running plans. Both answer 429 with `Retry-After`; the rate
also sends the RateLimit headers (`RateLimit-Limit`, `-Remaining`, `-Reset`) on every submit, so
a client can pace itself before it is refused."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from service.core.problems import ProblemException
from service.store import keys


@dataclass
class Grant:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int  # until the bucket is full again
    retry_after: int  # until one more submit is allowed

    def headers(self) -> dict[str, str]:
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
        }
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out


class SubmitRate:
    """`per_minute` submits per key, refilled continuously, bursting to `per_minute`. The
    bucket is a row in the store (`keys.take_submit`), so every API process and host sharing
    the database draws from the same one: one UPDATE per keyed submit."""

    def __init__(self, factory: sessionmaker[Session], per_minute: int) -> None:
        self.factory = factory
        self.capacity = per_minute
        self.rate = per_minute / 60.0

    def take(self, key_id: str) -> Grant:
        with self.factory() as session:
            allowed, tokens = keys.take_submit(
                session, key_id=key_id, capacity=self.capacity, per_second=self.rate, at=time.time()
            )
        return Grant(
            allowed,
            self.capacity,
            int(tokens),
            math.ceil((self.capacity - tokens) / self.rate),
            0 if allowed else math.ceil((1 - tokens) / self.rate),
        )


def too_many(grant: Grant) -> ProblemException:
    return ProblemException(
        429,
        "rate-limited",
        "Too many submits",
        f"this key may submit {grant.limit} plans a minute; retry in {grant.retry_after} s",
    ).with_headers(grant.headers())


def tenant_full(tenant: str, active: int, cap: int) -> ProblemException:
    return ProblemException(
        429,
        "tenant-quota",
        "Too many plans queued",
        f"tenant {tenant!r} has {active} plans queued or running; the cap is {cap} "
        "(TRAINPLAN_TENANT_MAX_ACTIVE): wait for some to finish",
    ).with_headers({"Retry-After": "30"})


async def get_submit_rate(request: Request) -> SubmitRate:
    return request.app.state.submit_rate


SubmitRateDep = Annotated[SubmitRate, Depends(get_submit_rate)]
