"""Plans claimed per second by N workers on PostgreSQL: the queue itself (claim + finish, no
profiling), each worker a separate process with its own connection, as in production.

    .venv/bin/python -m bench.queue [--workers 4] [--plans 2000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from bench.machine import header
from service.schemas.examples import RESULT_EXAMPLE, SMALL_GRAYSCALE_CNN
from service.schemas.result import PlanResult
from service.schemas.spec import PlanSpec
from service.store import claims, plans
from service.store.db import make_engine, make_session_factory, upgrade

ADMIN = os.environ.get(
    "TRAINPLAN_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


# What a succeeded plan stores (the OpenAPI example's result).
RESULT = PlanResult.model_validate(RESULT_EXAMPLE)


def _worker(url: str, name: str, start: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    factory = make_session_factory(make_engine(url))
    claimed: list[str] = []
    while time.time() < start:
        time.sleep(0.001)
    with factory() as session:
        while True:
            plan = claims.claim_next(
                session, worker_id=name, lease_seconds=60, device_kinds=("simulated",)
            )
            if plan is None:
                break
            claims.finish(
                session, plan_id=plan.id, worker_id=name, status="succeeded", result=RESULT
            )
            claimed.append(plan.id)
    out.put((name, claimed, time.time()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--plans", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(header())
    rates = []
    for _ in range(args.repeat):
        name = f"tp_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = ADMIN.rsplit("/", 1)[0] + "/" + name
        try:
            upgrade(url)
            factory = make_session_factory(make_engine(url))
            spec = PlanSpec.model_validate(SMALL_GRAYSCALE_CNN)
            with factory() as session:
                for _i in range(args.plans):
                    plans.create_plan(session, spec=spec.canonical(), spec_hash=spec.spec_hash)
                session.commit()
            out: mp.Queue = mp.get_context("spawn").Queue()  # type: ignore[type-arg]
            start = time.time() + 3
            procs = [
                mp.get_context("spawn").Process(target=_worker, args=(url, f"w{i}", start, out))
                for i in range(args.workers)
            ]
            for p in procs:
                p.start()
            results = [out.get() for _ in procs]
            for p in procs:
                p.join()
            ids = [i for _, claimed, _ in results for i in claimed]
            assert len(ids) == len(set(ids)) == args.plans, "a plan was lost or claimed twice"
            elapsed = max(t for _, _, t in results) - start
            rates.append(args.plans / elapsed)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    med = sorted(rates)[len(rates) // 2]
    print(
        f"{args.workers} workers, {args.plans} plans, {args.repeat} runs: median "
        f"{med:.0f} claims/s (claim + finish), runs {[round(r) for r in rates]}; "
        f"none lost, none claimed twice"
    )
    out_file = Path(__file__).parent / "results" / f"queue_{args.workers}w.json"
    out_file.write_text(
        json.dumps(
            {"header": header(), "args": vars(args), "rates": rates, "median": med}, indent=2
        )
    )


if __name__ == "__main__":
    main()
