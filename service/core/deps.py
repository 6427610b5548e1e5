"""Dependencies: settings and database sessions come in through `Depends` (who is calling:
service/auth/deps.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.core.problems import ProblemException


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_factory(request: Request) -> sessionmaker[Session]:
    return request.app.state.session_factory


def get_session(
    factory: Annotated[sessionmaker[Session], Depends(get_factory)],
) -> Iterator[Session]:
    with factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


async def require_json(request: Request) -> None:
    """A JSON body must say so: any other content type is a 415 (FastAPI read a `text/plain`
    body as a string and answered 'Input should be a valid dictionary'). Runs before the body
    is validated, so the client learns the real reason."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise ProblemException(
        415,
        "unsupported-media-type",
        "Unsupported media type",
        f"the body must be JSON sent as 'Content-Type: application/json', not {media or 'none'!r}",
    ).with_headers({"Accept-Post": "application/json"})


JsonBody = Depends(require_json)
