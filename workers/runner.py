"""Runs one plan in a child process, so a crash, a CUDA error or a runaway spec costs that plan and
never the worker. The child reports over a queue: ('trial', dict) per probe, then ('result', dict)
or ('error', problem). Nothing but the validated spec's JSON crosses into the child."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Any

from service.schemas.problem import problem


def child_main(spec_json: str, queue: Any) -> None:
    """Entry point of the child process."""
    try:
        from service.schemas.spec import PlanSpec
        from workers import engine

        spec = PlanSpec.model_validate_json(spec_json)
        try:
            result = engine.plan(spec, lambda t: queue.put(("trial", t.model_dump(mode="json"))))
        except engine.SpecError as exc:
            queue.put(
                (
                    "error",
                    problem(
                        "invalid-spec",
                        "The spec cannot be planned",
                        exc.message,
                        422,
                        errors=exc.as_problem_errors(),
                    ),
                )
            )
            return
        except ValueError as exc:
            queue.put(
                ("error", problem("invalid-spec", "The spec cannot be planned", str(exc), 422))
            )
            return
        queue.put(("result", result.model_dump(mode="json")))
    except Exception as exc:  # the child's last word: never a silent death
        detail = f"{type(exc).__name__}: {exc}"[:2000]
        queue.put(
            (
                "error",
                problem(
                    "plan-crashed",
                    "The plan failed on the worker",
                    detail,
                    500,
                    traceback=traceback.format_exc()[-4000:],
                ),
            )
        )


PRELOAD = [
    "workers.engine.profile",
    "workers.engine.devices.simulated",
    "workers.engine.devices.cpu",
    "workers.engine.models.layers",
    "workers.prewarm",
]


def _context() -> Any:
    """`forkserver`: children fork from a server that imported torch once (fast starts), and
    that server never touches CUDA, so each child initialises CUDA for itself, safely."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_child(spec_json: str) -> tuple[Any, Any]:
    """Start the child process for one plan; returns (process, queue)."""
    ctx = _context()
    queue = ctx.Queue()
    process = ctx.Process(
        target=child_main, args=(spec_json, queue), daemon=True, name="trainplan-plan"
    )
    process.start()
    return process, queue
