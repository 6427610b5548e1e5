"""The FastAPI application factory. `create_app(settings)` wires the store, the routes, problem
details, the request-size limit and (in `serve`) the embedded worker."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.model_checks import ModelChecks
from service.api.reads import PlanReads
from service.api.routes import integrations, plans, system, webhooks
from service.auth.audit import AuditLog
from service.auth.deps import KeyRing
from service.auth.quotas import SubmitRate
from service.config import Settings, get_settings
from service.core import problems
from service.dashboard import docs, pages, session
from service.dashboard.assets import STATIC_DIR, STATIC_URL
from service.feed.hub import PlanFeed
from service.feed.sources import run_source
from service.schemas.problem import problem
from service.store.db import make_engine, make_session_factory, upgrade
from workers import engine

DESCRIPTION = """Plans PyTorch training jobs: the largest micro-batch that fits (exact, by OOM
bisection on a real or simulated GPU), gradient accumulation to reach the global batch, the scaled
learning rate, and where the memory goes. Errors are RFC 9457 problem details."""


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413, however they are sent. A declared
    Content-Length over it is refused before anything is read; a chunked body is read into
    memory up to the limit first and refused as soon as it passes it (raising inside FastAPI's
    body read turned into a 400 "error parsing the body"), then replayed to the app."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(send)
            return
        if declared is not None or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)  # the server holds it to its declared length
            return
        buffered = await self._read(receive)
        if buffered is None:
            await self._too_large(send)
            return
        await self.app(scope, _replay(buffered, receive), send)

    async def _read(self, receive: Receive) -> list[Message] | None:
        """The request's messages up to its last body chunk; None past the limit."""
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # the client left: the app will see it
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return None
            if not message.get("more_body", False):
                return messages

    async def _too_large(self, send: Send) -> None:
        body = json.dumps(
            problem(
                "too-large",
                "Request too large",
                f"request bodies are limited to {self.limit} bytes",
                413,
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that hands out the buffered messages, then the live ones (disconnects)."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def create_app(settings: Settings | None = None, *, migrate: bool | None = None) -> FastAPI:
    """The API alone: routes, problem details, the body limit, and the state its requests
    share. Workers are not its business: `trainplan serve` (the composition root, service/cli.py)
    starts the embedded worker beside it."""
    settings = settings or get_settings()
    migrate = settings.migrate_on_start if migrate is None else migrate

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            upgrade(settings.database_url)
        engine = make_engine(settings.database_url)
        app.state.settings = settings
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        app.state.feed = feed = PlanFeed(app.state.session_factory)
        app.state.model_checks = ModelChecks(settings.model_check_cache)
        app.state.reads = PlanReads(app.state.session_factory, feed, settings)
        app.state.submit_rate = SubmitRate(
            app.state.session_factory, settings.submit_rate_per_minute
        )
        app.state.audit = audit = AuditLog(app.state.session_factory, settings.auth_mode == "keys")
        auditing = asyncio.create_task(audit.run())
        app.state.keyring = KeyRing(app.state.session_factory, settings.key_cache_seconds)
        source = asyncio.create_task(
            run_source(feed, settings.database_url, settings.feed_poll_seconds)
        )
        settle_heap()
        try:
            yield
        finally:
            for task in (source, auditing):
                task.cancel()
            await asyncio.gather(source, auditing, return_exceptions=True)
            await feed.close()
            engine.dispose()

    app = FastAPI(
        title="trainplan",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=problems.COMMON_RESPONSES,
        docs_url=None,  # served from the package's own assets: service/dashboard/docs.py
        redoc_url=None,
    )
    problems.install(app)
    app.include_router(plans.router)
    app.include_router(system.router)
    app.include_router(webhooks.router)
    app.include_router(integrations.router)
    app.include_router(docs.router)
    app.include_router(session.router)
    app.include_router(pages.router)
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def settle_heap() -> None:
    """Warm what submit needs (the engine loaded torch with this module), then move everything
    alive into the collector's permanent generation: otherwise each full collection walks
    torch's millions of objects, a pause of tens of milliseconds in some request's latency."""
    engine.versions()
    gc.collect()
    gc.freeze()


def app_from_env() -> Any:
    """ASGI factory for `uvicorn --factory service.api.app:app_from_env`."""
    return create_app()
