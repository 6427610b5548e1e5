"""Requests/s and p50/p99 latency of submit, get and list against one uvicorn process on
loopback (no embedded worker, so only the API is measured). Bounded in time and count.

    .venv/bin/python -m bench.api_load [--seconds 10] [--concurrency 16] [--db sqlite|postgres]
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
from pathlib import Path
from typing import Any

import httpx

from bench.machine import header
from service.schemas.examples import SMALL_GRAYSCALE_CNN

MAX_REQUESTS = 200_000


def _fresh_postgres() -> str:
    """A new database on the benchmark's PostgreSQL (dropped by hand or by the next run's
    clean-up; the default `test` database is never written)."""
    from sqlalchemy import create_engine, text

    admin_url = os.environ.get(
        "TRAINPLAN_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    name = "tp_bench_api"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(db_url: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TRAINPLAN_DATABASE_URL=db_url)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import uvicorn; from service.api.app import create_app; "
            f"uvicorn.run(create_app(embedded_worker=False), host='127.0.0.1', port={port}, "
            "log_level='warning', access_log=False)",
        ],
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


async def _load(url: str, make_request: Any, seconds: float, concurrency: int) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(MAX_REQUESTS))
    async with httpx.AsyncClient(
        base_url=url, timeout=30, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def one_user() -> None:
            while time.monotonic() < deadline:
                i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                response = await make_request(client, i)
                latencies.append(time.perf_counter() - start)
                if response.status_code >= 400:
                    raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

        await asyncio.gather(*(one_user() for _ in range(concurrency)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    print(header())
    tmp = tempfile.mkdtemp()
    db_url = f"sqlite:///{tmp}/load.db" if args.db == "sqlite" else _fresh_postgres()
    port = _port()
    proc = _start(db_url, port)
    url = f"http://127.0.0.1:{port}"
    try:
        # the first submit builds a model in a cold process: seconds on a busy 2-core box
        seed = httpx.post(
            url + "/v1/plans", json=SMALL_GRAYSCALE_CNN | {"refresh": True}, timeout=120
        )
        plan_id = seed.json()["id"]

        async def post(client: httpx.AsyncClient, i: int) -> httpx.Response:
            spec = copy.deepcopy(SMALL_GRAYSCALE_CNN)
            spec["training"]["epochs"] = 1 + (i % 100_000) / 1000 + time.time() % 1
            return await client.post("/v1/plans", json=spec)

        async def post_same(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.post("/v1/plans", json=SMALL_GRAYSCALE_CNN)

        async def get(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.get(f"/v1/plans/{plan_id}")

        async def listing(client: httpx.AsyncClient, i: int) -> httpx.Response:
            return await client.get("/v1/plans", params={"limit": 50})

        rows = []
        for name, fn in (
            ("POST /v1/plans (new plan)", post),
            ("POST /v1/plans (stored spec)", post_same),
            ("GET /v1/plans/{id}", get),
            ("GET /v1/plans?limit=50", listing),
        ):
            lat = asyncio.run(_load(url, fn, args.seconds, args.concurrency))
            lat.sort()
            rows.append(
                {
                    "route": name,
                    "requests": len(lat),
                    "rps": len(lat) / args.seconds,
                    "p50_ms": 1000 * statistics.median(lat),
                    "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
                }
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    print(f"db={args.db} concurrency={args.concurrency} seconds={args.seconds:g} per route")
    print(f"{'route':32} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(
            f"{r['route']:32} {r['requests']:>9} {r['rps']:>8.1f} {r['p50_ms']:>8.1f} "
            f"{r['p99_ms']:>8.1f}"
        )
    out = Path(__file__).parent / "results" / f"api_load_{args.db}.json"
    out.write_text(json.dumps({"header": header(), "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
