"""The `trainplan` command line: serve, worker, worker-health, db, keys, plan, gpus."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from sqlalchemy.orm import Session, sessionmaker

from service.client import TrainplanClient, TrainplanError
from service.config import get_settings
from service.core.principal import SCOPES
from service.schemas.plan import PlanStatus
from service.schemas.problem import problem
from service.schemas.result import MemoryBreakdown
from service.schemas.spec import PlanSpec
from service.store import keys
from service.store.db import (
    current_revision,
    head_revision,
    make_engine,
    make_session_factory,
    upgrade,
)

# Imported where a command needs them, not here: the engine and the worker loop load torch
# (1-3 s), the web app loads FastAPI and every route; `trainplan --help`, `keys` and `db` need
# neither.

app = typer.Typer(
    help="Plan PyTorch training jobs: max micro-batch, accumulation, LR, memory.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")
keys_app = typer.Typer(help="API keys per tenant (TRAINPLAN_AUTH_MODE=keys).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
err = Console(stderr=True)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    worker: Annotated[
        bool, typer.Option(help="Run the embedded worker (unless TRAINPLAN_EMBEDDED_WORKER=false).")
    ] = True,
) -> None:
    """Migrate the store, then serve the API beside one embedded worker (TRAINPLAN_API_WORKERS
    > 1: that many API processes, still one embedded worker, in this parent process).

    The composition root: the API (service.api) and the worker loop (workers.loop) know nothing
    of each other; they meet here, over the store."""
    from service.api.serving import serve_processes  # the web app: only `serve` needs it
    from workers.loop import start_threads  # torch

    settings = get_settings()
    host, port = host or settings.host, port or settings.port
    if settings.migrate_on_start:
        upgrade(settings.database_url)  # once, before a worker claims or a process serves
    stop = threading.Event()
    engine = make_engine(settings.database_url)
    embedded = worker and settings.embedded_worker
    threads = start_threads(settings, make_session_factory(engine), stop) if embedded else []
    try:
        if settings.api_workers == 1:
            import uvicorn  # the web app: only `serve` needs it

            from service.api.app import create_app

            uvicorn.run(create_app(settings, migrate=False), host=host, port=port, log_level="info")
        else:  # uvicorn's processes each build the app from the environment
            os.environ["TRAINPLAN_MIGRATE_ON_START"] = "false"
            serve_processes("service.api.app:app_from_env", host, port, settings.api_workers)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        engine.dispose()


@app.command("worker")
def worker_cmd(
    max_plans: Annotated[int | None, typer.Option(help="Stop after N plans.")] = None,
    migrate: Annotated[bool, typer.Option(help="Upgrade the store first.")] = False,
) -> None:
    """A standalone worker for a shared store (many GPU nodes on one PostgreSQL)."""
    from workers.loop import PlanWorker, flush_webhooks, start_webhook_sender  # torch

    settings = get_settings()
    if migrate:
        upgrade(settings.database_url)
    factory = make_session_factory(make_engine(settings.database_url))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker = PlanWorker(settings, factory)
    err.print(
        f"worker {worker.worker_id} on {settings.database_url.split('@')[-1]}, "
        f"devices: {', '.join(worker.kinds)}"
    )
    if settings.webhook_secret is not None:  # completion webhooks go out from the workers
        start_webhook_sender(settings, factory, stop)
    done = worker.run(stop, max_plans=max_plans)
    if settings.webhook_secret is not None:  # what became due last, before this process ends
        flush_webhooks(settings, factory)
    err.print(f"worker stopped after {done} plan(s)")


@app.command("worker-health")
def worker_health(
    max_age: Annotated[
        float | None,
        typer.Option(help="Seconds; default: three heartbeats (TRAINPLAN_HEARTBEAT_SECONDS)."),
    ] = None,
) -> None:
    """Exit 0 if this host's worker beat recently: a container health check. The worker touches
    TRAINPLAN_HEARTBEAT_FILE after each heartbeat the store accepted, so a stuck worker or one
    cut off from the store turns unhealthy."""

    settings = get_settings()
    if settings.heartbeat_file is None:
        err.print("TRAINPLAN_HEARTBEAT_FILE is not set: the worker writes no heartbeat file")
        raise typer.Exit(2)
    limit = max_age if max_age is not None else 3 * settings.heartbeat_seconds
    try:
        age = time.time() - settings.heartbeat_file.stat().st_mtime
    except FileNotFoundError:
        err.print(f"no heartbeat yet ({settings.heartbeat_file} does not exist)")
        raise typer.Exit(1) from None
    if age > limit:
        err.print(f"last heartbeat {age:.0f} s ago (limit {limit:.0f} s)")
        raise typer.Exit(1)
    print(f"last heartbeat {age:.1f} s ago")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all migrations to TRAINPLAN_DATABASE_URL."""

    upgrade(get_settings().database_url)
    err.print("database is at the latest revision")


@db_app.command("current")
def db_current() -> None:
    """Print the store's revision and the newest one this package knows; exit 1 if behind."""

    current, head = current_revision(get_settings().database_url), head_revision()
    print(f"current {current or 'none'}, head {head}")
    if current != head:
        raise typer.Exit(1)


def _store() -> sessionmaker[Session]:

    url = get_settings().database_url
    upgrade(url)
    return make_session_factory(make_engine(url))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for.")],
    scope: Annotated[str, typer.Option(help="Comma-separated: submit, read, admin.")] = (
        "submit,read"
    ),
) -> None:
    """Create a key and print it once: only its hash is stored."""
    scopes = sorted({s.strip() for s in scope.split(",") if s.strip()})
    unknown = set(scopes) - set(SCOPES)
    if not scopes or unknown or not tenant.strip() or len(tenant) > 100:
        err.print(f"[red]scopes are {', '.join(SCOPES)}; the tenant is 1-100 characters[/red]")
        raise typer.Exit(2)
    with _store()() as session:
        key, row = keys.issue_key(session, tenant=tenant.strip(), scopes=scopes)
    err.print(f"key {row.id} for tenant {row.tenant!r}, scopes {row.scopes}; shown once:")
    print(key)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option()] = None) -> None:
    """The keys (never the secrets): id, prefix, tenant, scopes, created, last used, revoked."""
    # id and prefix never wrap or shorten: `keys revoke` takes either, copied from here.
    table = Table(
        Column("id", no_wrap=True, min_width=8),
        Column("prefix", no_wrap=True, min_width=13),
        "tenant",
        "scopes",
        "created",
        "last used",
        "revoked",
    )
    with _store()() as session:
        for k in keys.list_keys(session, tenant=tenant):
            table.add_row(
                k.id,
                k.prefix + "...",
                k.tenant,
                k.scopes,
                str(k.created_at)[:19],
                str(k.last_used_at or "")[:19],
                str(k.revoked_at or "")[:19],
            )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key's id or prefix.")]) -> None:
    """Revoke a key (it stops working within seconds: API processes cache keys for 5 s)."""
    with _store()() as session:
        rows = keys.revoke_key(session, key_id_or_prefix=key)
    if not rows:
        err.print(f"[red]no live key {key!r}[/red]")
        raise typer.Exit(1)
    if len(rows) > 1:
        ids = ", ".join(r.id for r in rows)
        err.print(f"[red]{key!r} is the prefix of {len(rows)} live keys ({ids}): give the id[/red]")
        raise typer.Exit(2)
    err.print(f"revoked key {rows[0].id} of tenant {rows[0].tenant!r}")


@app.command()
def gpus() -> None:
    """List the GPU catalogue of the simulated device."""
    from workers import engine  # torch

    table = Table("name", "usable GiB", "fp32 TF", "tf32 TF", "fp16 TF", "bf16 TF", "GB/s")
    for g in engine.gpus():
        tflops = g["tflops"]
        table.add_row(
            g["name"],
            f"{g['memory_gib']:.2f}",
            f"{tflops['fp32']:g}",
            f"{tflops['tf32'] or '-'}",
            f"{tflops['fp16']:g}",
            f"{tflops['bf16'] or '-'}",
            f"{g['bandwidth_gbs']:g}",
        )
    Console().print(table)


@app.command()
def plan(
    spec_file: Annotated[Path, typer.Argument(help="Plan spec (JSON); - for stdin.")],
    local: Annotated[bool, typer.Option("--local", help="Run in process, no server.")] = False,
    server: Annotated[str, typer.Option(help="Server URL.")] = "http://127.0.0.1:8000",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan's JSON only.")] = False,
    refresh: Annotated[bool, typer.Option(help="Plan again even if stored.")] = False,
    token: Annotated[str | None, typer.Option(envvar="TRAINPLAN_TOKEN")] = None,
) -> None:
    """Plan SPEC.json: on a server (following its progress) or --local. With a key, pass
    --token or set TRAINPLAN_TOKEN. Every failure is one line on stderr and a non-zero exit
    (2: the spec or its file, 3: the server, 1: the plan failed); with --json, stdout is
    always one JSON document (the plan, or {"status": "failed", "error": problem})."""
    try:
        raw = _read_spec(spec_file)
        if local:
            body = _plan_local(raw, as_json)
        else:
            body = _plan_remote(raw, server, token, refresh, as_json)
    except CliFailure as failure:
        failure.report(as_json)
        raise typer.Exit(failure.code) from None
    if as_json:
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
    else:
        _print_plan(body)
    if body.get("status") != PlanStatus.succeeded:
        raise typer.Exit(1)


class CliFailure(Exception):
    """A failure the CLI reports in one line (and, under --json, as a problem on stdout)."""

    def __init__(self, code: int, problem: dict[str, Any], lines: tuple[str, ...] = ()) -> None:
        super().__init__(problem["detail"])
        self.code, self.problem, self.lines = code, problem, lines

    def report(self, as_json: bool) -> None:
        err.print(f"[red]{self.problem['title']}[/red]: {self.problem['detail']}", soft_wrap=True)
        for line in self.lines:
            err.print(f"  {line}", soft_wrap=True)
        if as_json:
            sys.stdout.write(json.dumps({"status": "failed", "error": self.problem}) + "\n")


def _failure(code: int, kind: str, title: str, detail: str, **extra: Any) -> CliFailure:
    body = problem(kind, title, detail, 0, **extra)
    del body["status"]  # no HTTP status: the exit code says how it failed
    return CliFailure(code, body)


def _read_spec(spec_file: Path) -> str:
    if str(spec_file) == "-":
        return sys.stdin.read()
    try:
        return spec_file.read_text()
    except FileNotFoundError:
        raise _failure(2, "no-spec", "No such spec file", str(spec_file)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise _failure(2, "no-spec", "Cannot read the spec file", f"{spec_file}: {exc}") from None


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        console=err,
        disable=quiet and not err.is_terminal,
    )


def _trial_text(trial: dict[str, Any]) -> str:
    mark = "fits" if trial["fits"] else "OOM "
    scenario = f" [dim]what-if {trial['scenario']}[/dim]" if trial.get("scenario") else ""
    peak = trial["peak_bytes"] / 2**30
    return f"batch {trial['batch_size']:>6} {mark} peak {peak:7.2f} GiB{scenario}"


def _plan_local(raw: str, quiet: bool) -> dict[str, Any]:
    from workers import engine  # torch

    try:
        spec = PlanSpec.model_validate_json(raw)
    except ValidationError as exc:
        errors = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise _failure(
            2, "validation-error", "The spec is invalid", errors[0], errors=errors
        ) from None
    with _progress(quiet) as progress:
        task = progress.add_task("probing", total=None, last="")

        def on_trial(trial: Any) -> None:
            progress.update(task, advance=1, last=_trial_text(trial.model_dump()))
            if not progress.disable:
                progress.console.print("  " + _trial_text(trial.model_dump()))

        try:
            result = engine.plan(spec, on_trial)
        except engine.SpecError as exc:  # Unsupported too: it names the layer and op
            field = ".".join(map(str, exc.loc))
            kind = "unsupported" if isinstance(exc, engine.Unsupported) else "invalid-spec"
            raise _failure(
                2, kind, "The spec cannot be planned", f"{field}: {exc.message}"
            ) from None
        except Exception as exc:  # a bug in the engine: one line, never a traceback
            raise _failure(
                1, "plan-crashed", "The plan failed", f"{type(exc).__name__}: {exc}"[:500]
            ) from None
    return {
        "id": None,
        "status": PlanStatus.succeeded,
        "spec": spec.canonical(),
        "spec_hash": spec.spec_hash,
        "result": result.model_dump(mode="json"),
    }


def _plan_remote(
    raw: str, server: str, token: str | None, refresh: bool, quiet: bool
) -> dict[str, Any]:
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _failure(2, "invalid-json", "The spec is not JSON", str(exc)) from None
    with TrainplanClient(server, token) as client:
        try:
            submitted = client.submit(spec, refresh=refresh)
            err.print(f"plan {submitted['id']} ({submitted['status']})")
            with _progress(quiet) as progress:
                task = progress.add_task("probing", total=None, last="")
                for event, data in client.events(submitted["id"]):
                    if event == "trial":
                        progress.update(task, advance=1, last=_trial_text(data))
            return client.get(submitted["id"])
        except TrainplanError as exc:
            errors = tuple(
                f"{e.get('field')}: {e.get('msg')}" for e in exc.problem.get("errors", [])
            )
            code = 2 if exc.problem.get("status") in (400, 413, 415, 422) else 3
            problem = {"title": "error", "detail": str(exc)} | exc.problem
            raise CliFailure(code, problem, errors) from None
        except httpx.HTTPError as exc:
            detail = f"{server}: {exc or type(exc).__name__}"
            hint = "start one with `trainplan serve`, pass --server URL, or plan with --local"
            raise _failure(
                3, "unreachable", "Cannot reach the server", f"{detail} ({hint})"
            ) from None


def _estimate_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Throughput with its band, and the chance of running out of memory (simulated plans)."""
    rows = []
    t = result.get("throughput")
    if t:
        text = f"{t['samples_per_second']:,.4g} samples/s"
        band = t.get("samples_per_second_band")
        if not t["measured"]:
            text += (
                f" (estimate; {t['band_coverage']:.0%} band {band[0]:,.4g}-{band[1]:,.4g})"
                if band and t.get("band_coverage")
                else " (estimate)"
            )
        rows.append(("throughput", text))
    risk = result.get("risk")
    if risk:
        rows.append(
            (
                "out-of-memory risk",
                f"{risk['oom_probability']:.2%} at micro-batch {result['micro_batch_size']}, "
                f"{risk['max_micro_batch_oom_probability']:.2%} at the max",
            )
        )
    return rows


def _long_context_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The plan's evaluation, token batching, experts, checkpointing choice, activation
    offload, context parallelism, depth folding and cost, where it has them."""
    rows = []
    evaluation = result.get("evaluation")
    if evaluation:
        rows.append(
            (
                "evaluation micro-batch",
                f"{evaluation['micro_batch_size']} (max {evaluation['max_micro_batch_size']}), "
                f"{evaluation['evaluations']} x {evaluation['iterations']} micro-batches",
            )
        )
    batching = result.get("token_batching")
    if batching:
        rows.append(
            (
                "token batching",
                f"{batching['batching']}: {batching['samples_per_micro_batch']:g} samples and "
                f"{batching['padding_fraction']:.0%} padding per micro-batch "
                f"(batches count {batching['batch_unit']})",
            )
        )
    moe = result.get("moe")
    if moe:
        rows.append(
            (
                "experts",
                f"{moe['experts']} per layer x {moe['moe_layers']} layers, top "
                f"{moe['experts_per_token']}; {moe['active_parameters']:,} of "
                f"{result['model_summary'].get('parameters', 0):,} parameters active per "
                f"token; {moe['implementation']} in {moe['expert_gemm_dtype']}",
            )
        )
    choice = result.get("checkpointing")
    if choice:
        tried = ", ".join(f"{c['policy']} {c['max_micro_batch_size']}" for c in choice["checked"])
        rows.append(
            (
                "checkpointing",
                f"{choice['policy']} (auto: least recompute reaching micro-batch "
                f"{choice['needed']}; max micro-batch by policy: {tried})",
            )
        )
    layout = result.get("layouts")
    if layout:
        tried = ", ".join(
            f"tp{c['tensor_parallel']} cp{c['context_parallel']} "
            + (f"{c['total_time_s'] / 3600:.2f} h" if c["feasible"] else "does not fit")
            for c in layout["checked"]
        )
        rows.append(
            (
                "layout",
                f"tp{layout['tensor_parallel']} cp{layout['context_parallel']} x fsdp "
                f"{layout['data_parallel']} (auto: shortest time to train of {tried})",
            )
        )
    split = (result.get("throughput") or {}).get("split") or {}
    if split.get("recompute_s"):
        rows.append(
            (
                "recompute",
                f"{split['recompute_s']:.3f} s per step: checkpointed blocks make "
                f"{_gib(int(split['recompute_bytes']))} of activations again in backward",
            )
        )
    if split.get("offload_bytes"):
        rows.append(
            (
                "activation offload",
                f"{_gib(result['memory']['host_offloaded'])} pinned on the host; "
                f"{_gib(int(split['offload_bytes']))} over PCIe per step, "
                f"{split['offload_s']:.3f} s of it",
            )
        )
    if split.get("context_parallel_bytes"):
        rows.append(
            (
                "context parallelism",
                f"ring over {_gib(int(split['context_parallel_bytes']))} per step per rank, "
                f"{split['context_parallel_s']:.3f} s of it",
            )
        )
    if split.get("tensor_parallel_bytes"):
        rows.append(
            (
                "tensor parallelism",
                f"all-reduces move {_gib(int(split['tensor_parallel_bytes']))} per step per "
                f"rank, {split['tensor_parallel_s']:.3f} s of it",
            )
        )
    folding = result.get("depth_folding")
    if folding:
        depths = folding["traced_depths"]
        rows.append(
            (
                "depth folding",
                f"{folding['layers']} blocks from traces of {depths[0]}-{depths[-1]} blocks"
                if folding["folded"]
                else f"{folding['layers']} blocks traced whole: {folding['reason']}",
            )
        )
    if result.get("traced_steps") is not None:
        rows.append(("traced steps", str(result["traced_steps"])))
    return rows


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _print_plan(body: dict[str, Any]) -> None:
    console = Console()
    result = body.get("result")
    if body.get("status") != PlanStatus.succeeded or result is None:
        console.print(f"[red]{body.get('status')}[/red]: {json.dumps(body.get('error'))}")
        return
    dev = result["device"]
    summary = Table(show_header=False, title=f"plan on {dev['name']} ({dev['backend']})")
    rows = [
        ("feasible", str(result["feasible"])),
        ("max micro-batch", str(result["max_micro_batch_size"])),
        (
            "micro-batch x accumulation",
            f"{result['micro_batch_size']} x {result['accumulation_steps']}",
        ),
        ("effective global batch", str(result["effective_global_batch_size"])),
        (
            "learning rate",
            f"{result['learning_rate']:.6g} ({result['lr_scaling']['rule']}, "
            f"x{result['lr_scaling']['factor']:.4g}, warm-up "
            f"{result['lr_scaling']['warmup_steps']} steps)",
        ),
        ("optimizer", f"{result.get('optimizer')} ({result.get('optimizer_impl')})"),
        ("iterations / epoch", str(result["iterations_per_epoch"])),
        (
            "optimizer steps / epoch, total",
            f"{result['optimizer_steps_per_epoch']}, {result['total_optimizer_steps']}",
        ),
        ("trials", str(len(result["trials"]))),
    ]
    sequence = result.get("sequence_length")
    if sequence:
        longest = f"{sequence['max_seq_len']} tokens" if sequence["max_seq_len"] else "none fits"
        bound = ", the bound" if sequence["bound_reached"] else ""
        rows.insert(
            0,
            (
                "longest sequence",
                f"{longest} at micro-batch {sequence['micro_batch_size']} "
                f"(step {sequence['granularity']}{bound})",
            ),
        )
    rows += _estimate_rows(result)
    rows += _long_context_rows(result)
    for key, value in rows:
        summary.add_row(key, value)
    console.print(summary)
    memory = result["memory"]
    mem = Table("memory at the chosen micro-batch", "bytes", "share", title=None)
    peak = max(memory["peak"], 1)
    for key in MemoryBreakdown.PARTS:
        share = memory[key] / peak
        mem.add_row(key, _gib(memory[key]), f"{'█' * round(share * 20):<20} {share:6.1%}")
    mem.add_row(
        "peak (allocated) / capacity", f"{_gib(memory['peak'])} / {_gib(memory['capacity'])}", ""
    )
    if memory.get("reserved") is not None:
        mem.add_row(
            "reserved (nvidia-smi) / capacity",
            f"{_gib(memory['reserved'])} / {_gib(memory['capacity'])}",
            "",
        )
    console.print(mem)
    _print_schedule(console, result)
    _print_what_if(console, result)
    for w in result.get("warnings", []):
        console.print(f"[yellow]warning[/yellow] {w['code']}: {w['message']}")
    for s in result.get("suggestions", []):
        console.print(f"[cyan]suggestion[/cyan] {s}")


def _print_schedule(console: Console, result: dict[str, Any]) -> None:
    """The learning rate at the schedule's points, with a bar against the peak."""
    schedule = result.get("schedule")
    if not schedule:
        return
    peak = max((p["learning_rate"] for p in schedule["points"]), default=0.0) or 1.0
    title = f"{schedule['name']} schedule over {schedule['total_steps']} optimizer steps"
    if schedule.get("upper_bound"):
        title += " (before any plateau cut)"
    table = Table("point", "step", "learning rate", "", title=title)
    for point in schedule["points"]:
        bar = "█" * round(point["learning_rate"] / peak * 20)
        table.add_row(point["label"], str(point["step"]), f"{point['learning_rate']:.4g}", bar)
    console.print(table)


def _print_what_if(console: Console, result: dict[str, Any]) -> None:
    """One row per neighbour, with a bar against the plan's own max micro-batch."""
    rows = result.get("what_if") or []
    if not rows:
        return
    base = max(result["max_micro_batch_size"], 1)
    table = Table("what if", "device", "max micro-batch", "vs this plan", title=None)
    for w in rows:
        ratio = w["max_micro_batch_size"] / base
        bar = "█" * min(round(ratio * 5), 15)
        bound = "+" if w["search_bound_reached"] else ""
        table.add_row(
            f"{w['change']} = {w['value']}",
            w["device"]["name"],
            f"{w['max_micro_batch_size']}{bound}" if w["feasible"] else "does not fit",
            f"{bar} {ratio:.2f}x" if result["feasible"] else "",
        )
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    app()
