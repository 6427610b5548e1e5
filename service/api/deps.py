"""Dependencies: settings, database sessions and auth come in through `Depends`."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from service.api.problems import ProblemException
from service.config import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_factory(request: Request) -> sessionmaker[Session]:
    return request.app.state.session_factory  # type: ignore[no-any-return]


def get_session(
    factory: Annotated[sessionmaker[Session], Depends(get_factory)],
) -> Iterator[Session]:
    with factory() as session:
        yield session


# Documents the scheme in OpenAPI; reads the header without a validated parameter per request.
BEARER = HTTPBearer(auto_error=False, description="A token from TRAINPLAN_API_TOKENS.")


async def require_auth(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> None:
    if settings.auth_mode == "none":
        return
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token or not any(secrets.compare_digest(token, t) for t in settings.api_tokens):
        raise ProblemException(
            401, "unauthorized", "Unauthorized", "send 'Authorization: Bearer <token>'"
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
FactoryDep = Annotated[sessionmaker[Session], Depends(get_factory)]
