"""Requests/s and p50/p99 latency of submit, get and list against uvicorn on loopback (no
embedded worker: only the API is measured), at 1 and 2 API processes; `--baseline` also
measures a bare FastAPI route returning the same stored bytes from the same database
(bench/baseline_app.py) and reports trainplan's ratio to it. Bounded in time and count.

    .venv/bin/python -m bench.api_load [--seconds 8] [--concurrency 16] [--db sqlite|postgres]
        [--processes 1 2] [--baseline] [--server-tree PATH]

The load generator is bench/http_client.py (raw asyncio keep-alive connections), which costs
the shared 2 cores far less than httpx would.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.http_client import Connection
from bench.machine import header
from service.schemas.examples import SMALL_GRAYSCALE_CNN

MAX_REQUESTS = 500_000
Request = tuple[str, str, Any]  # method, path, JSON body


def fresh_postgres(name: str = "tp_bench_api") -> str:
    """A new database on the benchmark's PostgreSQL (dropped by the next run; the default `test`
    database is never written)."""
    from sqlalchemy import create_engine, text

    admin_url = os.environ.get(
        "TRAINPLAN_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(
    factory: str, db_url: str, processes: int = 1, tree: str | None = None, **env: str
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """uvicorn serving an app factory (`module:function`) on a free port until the block ends:
    one process as `trainplan serve` runs it, several through its `serve_processes`."""
    port = free_port()
    environ = dict(
        os.environ,
        TRAINPLAN_DATABASE_URL=db_url,
        TRAINPLAN_EMBEDDED_WORKER="false",
        TRAINPLAN_MIGRATE_ON_START="false",
    )
    environ.update(env)
    launch = (
        "from service.api.serving import serve_processes; "
        f"serve_processes({factory!r}, '127.0.0.1', {port}, {processes}, 'warning', "
        "access_log=False)"
        if processes > 1
        else "import uvicorn; "
        f"uvicorn.run({factory!r}, factory=True, host='127.0.0.1', port={port}, "
        "log_level='warning', access_log=False)"
    )
    if tree:  # serve another checkout: its code first on the path (`-c` puts the cwd first)
        environ["PYTHONPATH"] = tree
    proc = subprocess.Popen(
        [sys.executable, "-c", launch], env=environ, cwd=tree, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError("server did not start")
        yield port, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


async def load(
    port: int, make_request: Callable[[int], Request], seconds: float, concurrency: int
) -> list[float]:
    """Latencies of `concurrency` clients sending requests back to back for `seconds`."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(MAX_REQUESTS))

    async def one_user(conn: Connection) -> None:
        while time.monotonic() < deadline and (i := next(counter, None)) is not None:
            method, path, body = make_request(i)
            start = time.perf_counter()
            status, payload = await conn.request(method, path, body)
            latencies.append(time.perf_counter() - start)
            if status >= 400:
                raise RuntimeError(f"{method} {path}: {status}: {payload[:200]!r}")

    conns = [Connection("127.0.0.1", port) for _ in range(concurrency)]
    try:
        await asyncio.gather(*(one_user(c) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    return latencies


def measure(
    name: str,
    port: int,
    make_request: Callable[[int], Request],
    args: argparse.Namespace,
    processes: int,
) -> dict[str, Any]:
    asyncio.run(load(port, make_request, min(1.0, args.seconds), args.concurrency))  # warm-up
    lat = sorted(asyncio.run(load(port, make_request, args.seconds, args.concurrency)))
    row = {
        "route": name,
        "processes": processes,
        "requests": len(lat),
        "rps": len(lat) / args.seconds,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
    }
    print(
        f"{name:40} x{processes} {row['requests']:>8} {row['rps']:>8.1f} "
        f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f}",
        flush=True,
    )
    return row


def in_tree(tree: str | None, db_url: str, *command: str) -> None:
    """Run `python command...` in the server's checkout (its code, its migrations)."""
    env = dict(os.environ, TRAINPLAN_DATABASE_URL=db_url)
    if tree:
        env["PYTHONPATH"] = tree
    subprocess.run([sys.executable, *command], cwd=tree, env=env, check=True, timeout=600)


def finished_plan(url: str, db_url: str, tree: str | None) -> str:
    """The example spec, submitted over HTTP and run to its end by that tree's worker."""
    submitted = httpx.post(url + "/v1/plans", json=SMALL_GRAYSCALE_CNN, timeout=120)
    submitted.raise_for_status()
    in_tree(tree, db_url, "-m", "service.cli", "worker", "--max-plans", "1")
    plan = httpx.get(f"{url}/v1/plans/{submitted.json()['id']}", timeout=30).json()
    assert plan["status"] == "succeeded", plan.get("error")
    return str(plan["id"])


def reading(path: str) -> Callable[[int], Request]:
    return lambda i: ("GET", path, None)


def new_spec(i: int) -> Request:
    spec = copy.deepcopy(SMALL_GRAYSCALE_CNN)
    spec["training"]["epochs"] = 1 + (i % 100_000) / 1000 + time.time() % 1
    return "POST", "/v1/plans", spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument(
        "--server-tree", default=None, help="serve another checkout (one process, no baseline)"
    )
    args = parser.parse_args()
    print(header())
    db_url = f"sqlite:///{tempfile.mkdtemp()}/load.db" if args.db == "sqlite" else fresh_postgres()
    tree = args.server_tree
    in_tree(
        tree,
        db_url,
        "-c",
        "from service.store.db import upgrade; import os; "
        "upgrade(os.environ['TRAINPLAN_DATABASE_URL'])",
    )
    plan_id = ""
    print(f"db={args.db} concurrency={args.concurrency} seconds={args.seconds:g} per route")
    print(f"{'route':40} {'procs':>3} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    rows = []
    app = "service.api.app:app_from_env"
    for n in args.processes:
        with serving(app, db_url, n, tree) as (port, _):
            plan_id = plan_id or finished_plan(f"http://127.0.0.1:{port}", db_url, tree)
            routes: list[tuple[str, Callable[[int], Request]]] = [
                ("POST /v1/plans (new plan)", new_spec),
                (
                    "POST /v1/plans (stored spec)",
                    lambda i: ("POST", "/v1/plans", SMALL_GRAYSCALE_CNN),
                ),
                ("GET /v1/plans/{id}", reading(f"/v1/plans/{plan_id}")),
                ("GET /v1/plans?limit=50", reading("/v1/plans?limit=50")),
            ]
            rows += [measure(name, port, fn, args, n) for name, fn in routes]
        if n == args.processes[0]:
            with serving(app, db_url, n, tree, TRAINPLAN_MODEL_CHECK_CACHE="0") as (port, _):
                rows.append(measure("POST /v1/plans (new plan, no cache)", port, new_spec, args, n))
        if args.baseline:
            with serving("bench.baseline_app:create", db_url, n) as (port, _):
                get = reading(f"/v1/plans/{plan_id}")
                rows.append(measure("baseline: bare route, same bytes", port, get, args, n))
    if args.baseline:
        for n in args.processes:
            ours = next(
                r for r in rows if r["route"] == "GET /v1/plans/{id}" and r["processes"] == n
            )
            bare = next(
                r for r in rows if r["route"].startswith("baseline") and r["processes"] == n
            )
            print(
                f"GET of a finished plan at {n} process(es): {ours['rps'] / bare['rps']:.2f}x "
                f"the baseline (p99 {ours['p99_ms']:.1f} vs {bare['p99_ms']:.1f} ms)"
            )
    suffix = f"_{Path(tree).name}" if tree else ""
    out = Path(__file__).parent / "results" / f"api_load_{args.db}{suffix}.json"
    out.write_text(json.dumps({"header": header(), "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
