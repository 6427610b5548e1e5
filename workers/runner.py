"""Runs one plan in a child process, so a crash, a CUDA error or a runaway spec costs that plan and
never the worker. The child reports over a queue: ('trial', dict) per probe, then ('result', dict)
or ('error', problem). Nothing but the validated spec's JSON crosses into the child."""

from __future__ import annotations

import multiprocessing as mp
import resource
import traceback
from typing import Any

from service.schemas.problem import problem
from service.schemas.spec import PlanSpec
from workers import engine


def child_main(spec_json: str, queue: Any, memory_limit: int = 0) -> None:
    """Entry point of the child process."""
    try:
        spec = PlanSpec.model_validate_json(spec_json)
        if memory_limit and spec.device.kind != "cuda":
            cap_memory(memory_limit)
        try:
            result = engine.plan(spec, lambda t: queue.put(("trial", t.model_dump(mode="json"))))
        except engine.Unsupported as exc:
            queue.put(("error", unsupported_problem(exc)))
            return
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
        if memory_limit and _out_of_memory(exc):
            queue.put(("error", memory_problem(memory_limit)))
            return
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


def unsupported_problem(exc: Any) -> dict[str, Any]:
    """A model the engine cannot trace: a 422 naming the layer and op (never a raw 500)."""
    return problem(
        "unsupported",
        "trainplan cannot plan this model",
        exc.message,
        422,
        unsupported=exc.what,
        errors=exc.as_problem_errors(),
    )


def cap_memory(limit: int) -> None:
    """Cap the plan process's data segment (heap and private anonymous maps, where Python
    objects and CPU tensors live; RLIMIT_DATA since Linux 4.7): past it, an allocation fails
    (MemoryError, or torch's "can't allocate memory") instead of the process growing until the
    OS kills it or the machine. Not RLIMIT_AS: torch maps 3 GiB of address space just by being
    imported. Not on a cuda device: the driver's mappings are unvalidated under a cap."""
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def memory_problem(limit: int) -> dict[str, Any]:
    return problem(
        "plan-memory-limit",
        "The plan exceeded its memory limit",
        f"planning this spec needed more than the {limit / 2**30:g} GiB a plan may use on this "
        "worker (TRAINPLAN_PLAN_MEMORY_LIMIT_GIB): a smaller model, sequence or search bound "
        "plans within it",
        422,
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


def start_child(spec_json: str, memory_limit: int = 0) -> tuple[Any, Any]:
    """Start the child process for one plan (its memory capped at `memory_limit` bytes, 0: no
    cap); returns (process, queue)."""
    ctx = _context()
    queue = ctx.Queue()
    process = ctx.Process(
        target=child_main,
        args=(spec_json, queue, memory_limit),
        daemon=True,
        name="trainplan-plan",
    )
    process.start()
    return process, queue
