"""What tells the feed that a plan changed. On PostgreSQL the worker's writes NOTIFY on
`common.CHANNEL` and one connection per API process LISTENs; on SQLite (no notifications) one task
per process polls the signatures of the plans being followed, in one query per tick."""

from __future__ import annotations

import asyncio

import structlog
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import make_url

from service.feed.hub import PlanFeed
from service.store import common, plans
from service.store.db import count_statement

log = structlog.get_logger("trainplan.feed")


async def poll(feed: PlanFeed, interval: float) -> None:
    """The SQLite source: compare what each followed plan looks like now with what its
    followers were last told; refresh the ones that differ (or are gone)."""
    while True:
        await asyncio.sleep(interval)
        ids = feed.watched()
        if not ids:
            continue
        try:
            seen = await run_in_threadpool(_signatures, feed, ids)
        except Exception as exc:
            log.warning("feed.poll_failed", error=str(exc)[:300])
            continue
        feed.changed(
            plan_id
            for plan_id in ids
            if (entry := feed.followed.get(plan_id)) is not None
            and (entry.state is None or seen.get(plan_id) != entry.state.signature)
        )


def _signatures(feed: PlanFeed, ids: list[str]) -> dict[str, tuple[object, ...]]:
    with feed.factory() as session:
        return plans.signatures(session, plan_ids=ids)


async def listen(feed: PlanFeed, database_url: str, retry_seconds: float = 1.0) -> None:
    """The PostgreSQL source: LISTEN on one connection of its own; after it drops and comes back,
    every followed plan is refreshed (a notification may have been missed meanwhile)."""
    import psycopg  # the optional `postgres` extra: only a PostgreSQL store listens

    url = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    connected_before = False
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute(f"LISTEN {common.CHANNEL}")
                count_statement()
                if connected_before:
                    feed.changed(feed.watched())
                connected_before = True
                async for note in conn.notifies():
                    feed.changed((note.payload,))
        except (psycopg.Error, OSError) as exc:
            log.warning("feed.listen_failed", error=str(exc)[:300])
            connected_before = True
        await asyncio.sleep(retry_seconds)


async def run_source(feed: PlanFeed, database_url: str, poll_seconds: float) -> None:
    if make_url(database_url).get_backend_name() == "postgresql":
        await listen(feed, database_url)
    else:
        await poll(feed, poll_seconds)
