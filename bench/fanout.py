"""Many clients following running plans: database load and delivery delay of the change feed.

    .venv/bin/python -m bench.fanout [--db postgres|sqlite] [--clients 100 1000] [--plans 50]
        [--seconds 10] [--rate 20] [--server-tree PATH]

For each client count: C server-sent-event streams spread over P running plans, while a writer
in this process commits `rate` trials/s round-robin over the plans as a worker would (INSERT +
NOTIFY in one transaction). Reported: the API process's SQL statements/s (its
`trainplan_db_statements_total`), PostgreSQL's transactions/s on the bench database (both
trees), and the delay from a trial's commit to its event at each client (median, p99). Then C
long polls (`?wait=60`) on fresh running plans: statements/s while they wait, and the delay
from each plan's final commit to its answer (the plans end at the same rate, one by one).

`--server-tree PATH` serves the API from another checkout (e.g. a `git worktree` of an older
commit) against the same bench, for a before/after table: setup and writes are plain SQL and
HTTP, so they work against either tree's schema.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, text

from bench.api_load import fresh_postgres, serving
from bench.http_client import Connection
from bench.machine import header
from service.schemas.examples import SMALL_GRAYSCALE_CNN
from service.store.db import make_engine

CHANNEL = "trainplan_plans"


def now() -> datetime:
    return datetime.now(UTC)


def running_plans(url: str, engine: Engine, count: int) -> list[str]:
    """`count` plans submitted over HTTP, then marked running by a pretend worker."""
    ids = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(count):
            spec = json.loads(json.dumps(SMALL_GRAYSCALE_CNN))
            spec["training"]["epochs"] = 1 + i / 1000 + time.time() % 1
            r = client.post("/v1/plans", json=spec)
            r.raise_for_status()
            ids.append(r.json()["id"])
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE plans SET status = 'running', attempts = 1, worker_id = 'bench', "
                "started_at = :t, updated_at = :t, lease_until = :lease WHERE id = :id"
            ),
            [{"id": i, "t": now(), "lease": now() + timedelta(hours=1)} for i in ids],
        )
    return ids


def _notify(conn: Any, plan_id: str) -> None:
    """As the worker's writes announce a change: a tree whose schema has the NOTIFY triggers
    (migration 0006) needs nothing more; an older one sent `pg_notify` itself."""
    if conn.dialect.name == "postgresql" and not _has_triggers(conn):
        conn.execute(text("SELECT pg_notify(:c, :id)"), {"c": CHANNEL, "id": plan_id})


_TRIGGERS: dict[str, bool] = {}


def _has_triggers(conn: Any) -> bool:
    url = str(conn.engine.url)
    if url not in _TRIGGERS:
        found = conn.execute(
            text("SELECT count(*) FROM pg_trigger WHERE tgname = 'trainplan_trial_stored'")
        ).scalar_one()
        _TRIGGERS[url] = bool(found)
    return _TRIGGERS[url]


def add_trial(engine: Engine, plan_id: str, index: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                'INSERT INTO trials (plan_id, attempt, "index", batch_size, fits, peak_bytes, '
                "duration_s, phase, created_at) VALUES (:p, 1, :i, :b, true, :peak, 0.01, "
                "'search', :t)"
            ),
            {"p": plan_id, "i": index, "b": 8 + index, "peak": 1 << 20, "t": now()},
        )
        _notify(conn, plan_id)


def finish(engine: Engine, plan_id: str) -> None:
    error = json.dumps({"type": "about:blank", "title": "cancelled", "status": 409})
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE plans SET status = 'cancelled', finished_at = :t, updated_at = :t, "
                "lease_until = NULL, error = :e WHERE id = :id"
            ),
            {"id": plan_id, "t": now(), "e": error},
        )
        _notify(conn, plan_id)


def statements(url: str) -> float | None:
    """The API process's statement counter (None on a tree without it)."""
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("trainplan_db_statements_total"):
            return float(line.split()[-1])
    return None


def transactions(engine: Engine) -> float | None:
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        return float(
            conn.execute(
                text(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                    "WHERE datname = current_database()"
                )
            ).scalar_one()
        )


class Window:
    """Statements and transactions over a timed window."""

    def __init__(self, url: str, engine: Engine) -> None:
        self.url, self.engine = url, engine

    def __enter__(self) -> Window:
        time.sleep(1.0)  # PostgreSQL's statistics are flushed about once a second
        self.s0, self.x0, self.t0 = statements(self.url), transactions(self.engine), time.time()
        return self

    def __exit__(self, *_: Any) -> None:
        time.sleep(1.0)
        s1, x1, t1 = statements(self.url), transactions(self.engine), time.time()
        span = t1 - self.t0
        self.statements_per_s = None if s1 is None or self.s0 is None else (s1 - self.s0) / span
        self.xacts_per_s = None if x1 is None or self.x0 is None else (x1 - self.x0) / span


def write_trials(
    engine: Engine, plans: list[str], rate: float, seconds: float, committed: dict[Any, float]
) -> None:
    """`rate` trials/s round-robin over `plans` for `seconds`; commit times by (plan, index)."""
    next_index = dict.fromkeys(plans, 0)
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds:
        plan_id = plans[n % len(plans)]
        index = next_index[plan_id]
        add_trial(engine, plan_id, index)
        committed[(plan_id, index)] = time.perf_counter()
        next_index[plan_id] = index + 1
        n += 1
        time.sleep(max(0.0, start + n / rate - time.perf_counter()))


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median_ms": None, "p99_ms": None}
    values = sorted(values)
    return {
        "median_ms": 1000 * statistics.median(values),
        "p99_ms": 1000 * values[int(0.99 * (len(values) - 1))],
    }


async def follow_streams(
    port: int,
    plans: list[str],
    clients: int,
    run_writer: Any,
) -> tuple[list[float], int, int]:
    """Open `clients` SSE streams, run the writer, return (delays, delivered, expected)."""
    received: list[dict[tuple[str, int], float]] = [{} for _ in range(clients)]
    connected = 0
    all_connected = asyncio.Event()
    stop = asyncio.Event()

    async def one(k: int) -> None:
        nonlocal connected
        plan_id = plans[k % len(plans)]
        stream = Connection("127.0.0.1", port).stream(f"/v1/plans/{plan_id}/events")
        try:
            async for chunk in stream:
                if chunk == b"":
                    connected += 1
                    if connected == clients:
                        all_connected.set()
                    continue
                at = time.perf_counter()
                for block in chunk.decode().split("\n\n"):
                    if "event: trial" in block:  # the index from the data: ids differ by tree
                        data = json.loads(block[block.index("data: ") + 6 :].split("\n")[0])
                        received[k][(plan_id, data["index"])] = at
                if stop.is_set():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return

    tasks = [asyncio.create_task(one(k)) for k in range(clients)]
    await asyncio.wait_for(all_connected.wait(), 120)
    committed: dict[Any, float] = await asyncio.to_thread(run_writer)
    await asyncio.sleep(2.0)  # the last trials' events
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    delays, expected = [], 0
    for k in range(clients):
        plan_id = plans[k % len(plans)]
        for (p, index), at in committed.items():
            if p != plan_id:
                continue
            expected += 1
            if (p, index) in received[k]:
                delays.append(received[k][(p, index)] - at)
    return delays, len(delays), expected


async def long_polls(
    port: int, plans: list[str], clients: int, waiting: Any, finish_all: Any
) -> tuple[list[float], int]:
    """`clients` long polls; `waiting()` runs while they wait; then `finish_all()` ends the plans
    and returns their commit times. Returns (delays, answered)."""
    answered: dict[int, float] = {}

    async def one(k: int) -> None:
        conn = Connection("127.0.0.1", port)
        await conn.request("GET", f"/v1/plans/{plans[k % len(plans)]}?wait=60")
        answered[k] = time.perf_counter()
        await conn.close()

    tasks = [asyncio.create_task(one(k)) for k in range(clients)]
    await asyncio.sleep(3.0)  # all requests in and waiting
    await asyncio.to_thread(waiting)
    early = len(answered)
    finished: dict[str, float] = await asyncio.to_thread(finish_all)
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 90)
    delays = [
        answered[k] - finished[plans[k % len(plans)]]
        for k in answered
        if plans[k % len(plans)] in finished
    ]
    return delays, len(answered) - early


def measure(
    url: str, port: int, engine: Engine, clients: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The SSE row and the long-poll row at one client count, each on fresh running plans."""
    plans = running_plans(url, engine, args.plans)
    window = Window(url, engine)

    def run_writer() -> dict[Any, float]:
        committed: dict[Any, float] = {}
        with window:
            write_trials(engine, plans, args.rate, args.seconds, committed)
        return committed

    delays, delivered, expected = asyncio.run(follow_streams(port, plans, clients, run_writer))
    sse = {
        "mode": "sse",
        "clients": clients,
        "statements_per_s": window.statements_per_s,
        "xacts_per_s": window.xacts_per_s,
        "delivered": delivered,
        "expected": expected,
        **percentiles(delays),
    }
    print(json.dumps(sse), flush=True)

    polls = running_plans(url, engine, args.plans)
    poll_window = Window(url, engine)

    def waiting() -> None:
        with poll_window:
            write_trials(engine, polls, args.rate, args.seconds, {})

    def finish_all() -> dict[str, float]:
        """End the plans at the writer's rate, as plans end in a busy system (not all at once)."""
        done = {}
        for plan_id in polls:
            finish(engine, plan_id)
            done[plan_id] = time.perf_counter()
            time.sleep(1 / args.rate)
        return done

    delays, woke = asyncio.run(long_polls(port, polls, clients, waiting, finish_all))
    poll = {
        "mode": "long poll",
        "clients": clients,
        "statements_per_s": poll_window.statements_per_s,
        "xacts_per_s": poll_window.xacts_per_s,
        "answered_after_end": woke,
        **percentiles(delays),
    }
    print(json.dumps(poll), flush=True)
    return [sse, poll]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--plans", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=20, help="trials committed per second")
    parser.add_argument("--server-tree", default=None)
    args = parser.parse_args()
    print(header())
    import tempfile

    db_url = (
        f"sqlite:///{tempfile.mkdtemp()}/fanout.db"
        if args.db == "sqlite"
        else fresh_postgres("tp_bench_fanout")
    )
    engine = make_engine(db_url)
    env = {"TRAINPLAN_MIGRATE_ON_START": "true"}
    tree = args.server_tree or "this tree"
    print(
        f"server: {tree}; db={args.db}; plans={args.plans}; rate={args.rate}/s; "
        f"window={args.seconds:g} s"
    )
    rows: list[dict[str, Any]] = []
    app = "service.api.app:app_from_env"
    with serving(app, db_url, 1, args.server_tree, **env) as (port, _):
        url = f"http://127.0.0.1:{port}"
        for clients in args.clients:
            rows += measure(url, port, engine, clients, args)
    print(
        f"{'mode':10} {'clients':>7} {'stmts/s':>9} {'PG xacts/s':>10} {'median ms':>9} "
        f"{'p99 ms':>8}  delivered"
    )
    for r in rows:
        got = (
            f"{r['delivered']}/{r['expected']}"
            if r["mode"] == "sse"
            else f"{r['answered_after_end']}/{r['clients']}"
        )
        print(
            f"{r['mode']:10} {r['clients']:>7} {_fmt(r['statements_per_s']):>9} "
            f"{_fmt(r['xacts_per_s']):>10} {_fmt(r['median_ms']):>9} {_fmt(r['p99_ms']):>8}  {got}"
        )
    name = f"fanout_{args.db}{'_' + Path(args.server_tree).name if args.server_tree else ''}"
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.write_text(json.dumps({"header": header(), "args": vars(args), "rows": rows}, indent=2))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
