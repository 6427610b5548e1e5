"""What the read routes (GET with its long poll, the event stream) need, as one dependency: the
session factory, the process's change feed and the settings. A GET of a finished plan costs
about half a millisecond of CPU in all, of which FastAPI spends tens of microseconds on each
dependency it resolves, so the hot path resolves one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.feed.hub import PlanFeed


@dataclass(frozen=True)
class PlanReads:
    factory: sessionmaker[Session]
    feed: PlanFeed
    settings: Settings


async def get_reads(request: Request) -> PlanReads:
    return request.app.state.reads


ReadsDep = Annotated[PlanReads, Depends(get_reads)]
