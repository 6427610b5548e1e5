"""What the shared submit bucket costs a keyed submit, and that it holds across processes.

Each key's token bucket is a row of the store (`keys.take_submit`, one conditional UPDATE), so
API processes share it. This times `SubmitRate.take` alone, back to back and from several
processes at once, on SQLite and PostgreSQL, and counts how many takes a burst was granted
against the bucket's size plus its refill over the run (no process may overdraw it).

    python -m bench.submit_rate [--takes 2000] [--processes 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time

from bench.api_load import fresh_postgres
from bench.machine import header
from service.auth.quotas import SubmitRate
from service.store import keys
from service.store.db import make_engine, make_session_factory, upgrade


def _takes(url: str, key_id: str, per_minute: int, n: int) -> tuple[list[float], int]:
    rate = SubmitRate(make_session_factory(make_engine(url)), per_minute)
    latencies, granted = [], 0
    for _ in range(n):
        start = time.perf_counter()
        granted += rate.take(key_id).allowed
        latencies.append(time.perf_counter() - start)
    return latencies, granted


def _key(url: str) -> str:
    with make_session_factory(make_engine(url))() as session:
        return keys.issue_key(session, tenant="bench", scopes=["submit"])[1].id


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--takes", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    print(header())
    stores = {
        "sqlite": f"sqlite:///{tempfile.mkdtemp()}/rate.db",
        "postgres": fresh_postgres("tp_bench_rate"),
    }
    print(f"{'store':9} {'case':32} {'takes':>6} {'granted':>8} {'median ms':>10} {'p99 ms':>8}")
    for name, url in stores.items():
        upgrade(url)
        # one process, a bucket that never empties: the cost of a take
        lat, granted = _takes(url, _key(url), 10**9, args.takes)
        _row(name, "1 process, always granted", lat, granted)
        # N processes drain one bucket of `size` at once: exactly `size` granted in all
        size = args.takes // 2
        key_id = _key(url)
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            share = args.takes // args.processes
            start = time.monotonic()
            runs = pool.starmap(_takes, [(url, key_id, size, share)] * args.processes)
            elapsed = time.monotonic() - start  # includes the workers' start: a loose bound
        lat = [x for latencies, _ in runs for x in latencies]
        granted = sum(g for _, g in runs)
        _row(name, f"{args.processes} processes, bucket of {size}", lat, granted)
        print(
            f"{'':9} at most {size} + the refill over {elapsed:.1f} s "
            f"({size / 60 * elapsed:.0f}) may be granted: {granted} were"
        )


def _row(store: str, case: str, lat: list[float], granted: int) -> None:
    lat = sorted(lat)
    print(
        f"{store:9} {case:32} {len(lat):>6} {granted:>8} "
        f"{1000 * statistics.median(lat):>10.2f} {1000 * lat[int(0.99 * (len(lat) - 1))]:>8.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
