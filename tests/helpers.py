"""Helpers the tests share: specs (built from service/schemas/examples.py's named models), a
fresh probe, an exactness check, a queued plan, DeepSpeed's config module told it runs as rank 0.
Tests import these from here, not from each other."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import TensorDataset

from service.config import Settings
from service.schemas.examples import MLP_MODEL, TINY_LLAMA, TINY_MLP_MODEL
from service.schemas.spec import PlanSpec
from service.store import plans
from workers import engine
from workers.engine.compiled import compile_job
from workers.engine.configs import PlanNumbers, build_configs
from workers.engine.devices import ProbeSession, open_device, open_session
from workers.engine.models import BuiltModel, build_model

__all__ = ["TINY_LLAMA"]  # re-exported: tests import it from here


# The experts' part of tiny configs of transformers' MoE architectures (the tests add the
# hidden sizes and the router's top k).
TINY_MOE: dict[str, dict[str, Any]] = {
    "MixtralForCausalLM": {"num_local_experts": 4},
    "Qwen3MoeForCausalLM": {"num_experts": 4, "moe_intermediate_size": 32},
    "Qwen2MoeForCausalLM": {
        "num_experts": 4,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
    },
    "DeepseekV3ForCausalLM": {
        "n_routed_experts": 4,
        "moe_intermediate_size": 32,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
    },
    "GptOssForCausalLM": {
        "num_local_experts": 4,
        "head_dim": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}


def free_port() -> int:
    """A TCP port free on loopback now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registered_spec(name: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "model": {"source": "registered", "name": name, "kwargs": kwargs},
        "data": {"kind": "tensor", "shape": [64], "num_classes": 10, "num_samples": 1000},
        "training": {"optimizer": "adam", "global_batch_size": 128},
        "device": {"kind": "simulated", "memory_gib": 1},
        "search": {"what_if": False},
    }


def enqueue(factory: Any, spec: dict[str, Any]) -> str:
    parsed = PlanSpec.model_validate(spec)
    with factory() as s:
        plan = plans.create_plan(s, spec=parsed.canonical(), spec_hash=parsed.spec_hash)
        s.commit()
        return plan.id


def mlp_spec(
    optimizer: str = "adam", precision: str = "fp32", memory_gib: float = 0.25, **training: Any
) -> dict[str, Any]:
    return {
        "model": deepcopy(MLP_MODEL),
        "data": {"kind": "tensor", "shape": [512], "num_classes": 10, "num_samples": 10000},
        "training": {
            "optimizer": optimizer,
            "precision": precision,
            "global_batch_size": 64,
            **training,
        },
        "device": {"kind": "simulated", "memory_gib": memory_gib},
        "search": {"headroom": 0.0, "max_batch_size": 1 << 20, "what_if": False},
    }


def model_of(spec: PlanSpec) -> BuiltModel:
    """The spec's model on the meta device, as the engine builds it."""
    return build_model(spec.model, spec.data, spec.training.peft)


def configs_of(spec: PlanSpec, **numbers: Any) -> dict[str, Any]:
    """The spec's framework configs for plan numbers (defaults below, overridable)."""
    given = {
        "micro_batch_size": 4,
        "accumulation_steps": 2,
        "world_size": 1,
        "learning_rate": 1e-4,
        "warmup_steps": 0,
        "total_optimizer_steps": 10,
    }
    return build_configs(compile_job(spec).launch, PlanNumbers(**(given | numbers)))


def session_of(spec: PlanSpec) -> AbstractContextManager[ProbeSession]:
    """A probe session of the spec's job on the spec's own device."""
    job = compile_job(spec)
    return open_session(open_device(job), job)


def probe_fresh(spec: PlanSpec, batches: list[int]) -> dict[int, bool]:
    """Probe batches in a new session, independent of the search that produced the answer."""
    with session_of(spec) as session:
        return {b: session.probe(b).fits for b in batches}


def assert_exact(spec_dict: dict[str, Any]) -> Any:
    """Plan the spec (without what-ifs) and check the answer with independent fresh probes."""
    spec_dict = spec_dict | {"search": {**spec_dict.get("search", {}), "what_if": False}}
    spec = PlanSpec.model_validate(spec_dict)
    result = engine.plan(spec)
    answer = result.max_micro_batch_size
    assert answer >= 1
    checks = probe_fresh(spec, [answer, answer + 1])
    assert checks[answer] is True and checks[answer + 1] is False
    by_batch = {t.batch_size: t for t in result.trials}
    assert by_batch[answer].fits and not by_batch[answer + 1].fits
    return result


def tensor_spec(**training: Any) -> PlanSpec:
    """A small MLP on 16 features; the search bound of 48 forces accumulation for a global 256."""
    return PlanSpec.model_validate(
        {
            "model": deepcopy(TINY_MLP_MODEL),
            "data": {"kind": "tensor", "shape": [16], "num_classes": 4, "num_samples": 1000},
            "training": {
                "optimizer": "sgd_momentum",
                "global_batch_size": 256,
                "base_lr": 0.1,
                "base_batch_size": 64,
                "epochs": 2,
                **training,
            },
            "device": {"kind": "simulated", "memory_gib": 1},
            "search": {"max_batch_size": 48, "micro_batch": "power_of_two", "what_if": False},
        }
    )


class Mpu:
    """The model-parallel unit DeepSpeed asks for the data-parallel world size."""

    def __init__(self, world: int) -> None:
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def deepspeed_config_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """DeepSpeed's config module, told it runs as rank 0 so that it asks the mpu for the
    data-parallel world size (without a process group it would assume 1)."""
    module = pytest.importorskip("deepspeed.runtime.config")
    monkeypatch.setattr(module.dist, "get_rank", lambda *a, **k: 0)
    return module


class Counting(nn.Module):
    """A tiny classifier that counts the samples of each optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.net(x)


def run_pytorch_loop(
    code: str,
    num_samples: int,
    evaluate: Callable[[nn.Module], float] | None = None,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Execute the generated loop (trainplan's own text, never a request's) on the CPU; `steps`
    holds the samples and `lrs` each group's learning rate of every optimizer step."""
    torch.manual_seed(0)
    model = model or Counting()
    steps: list[int] = []
    lrs: list[list[float]] = []
    data = TensorDataset(torch.randn(num_samples, 16), torch.randint(0, 4, (num_samples,)))
    scope: dict[str, Any] = {
        "model": model,
        "train_dataset": data,
        "loss_fn": nn.CrossEntropyLoss(),
        "evaluate": evaluate,
    }

    def record(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        steps.append(getattr(model, "seen", 0))
        lrs.append([float(group["lr"]) for group in opt.param_groups])
        model.seen = 0

    handle = register_optimizer_step_pre_hook(record)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GradScaler without CUDA
            exec(compile(code, "<plan>", "exec", dont_inherit=True), scope)
    finally:
        handle.remove()
    scope["steps"] = steps
    scope["lrs"] = lrs
    return scope


def recipe_scope(source: str) -> dict[str, Any]:
    """Run a plan's `configs.recipe` (trainplan's own text) into a namespace."""
    scope: dict[str, Any] = {}
    exec(compile(source, "<recipe>", "exec", dont_inherit=True), scope)
    return scope


def run_lightning(configs: dict[str, Any], num_samples: int) -> tuple[Any, list[float]]:
    """Fit Counting with Lightning as a plan's configs say (its trainer arguments, optimizer,
    `configs.recipe`'s param groups and scheduler); returns the trainer and the first group's
    learning rate at each optimizer step."""
    pl = pytest.importorskip("lightning.pytorch")
    cfg = configs["lightning"]
    recipe = recipe_scope(configs["recipe"])
    rates: list[float] = []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Counting()

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
            rates.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            super().optimizer_step(*args, **kwargs)

        def configure_optimizers(self) -> Any:
            module, name = cfg["optimizer"].rsplit(".", 1)
            optimizer_class = getattr(__import__(module, fromlist=[name]), name)
            optimizer = optimizer_class(
                recipe["param_groups"](self), lr=cfg["learning_rate"], **cfg["optimizer_kwargs"]
            )
            scheduler = {"scheduler": recipe["make_scheduler"](optimizer), **cfg["lr_scheduler"]}
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

    data = TensorDataset(torch.randn(num_samples, 16), torch.randint(0, 4, (num_samples,)))
    trainer = pl.Trainer(
        **cfg["trainer"],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=cfg["batch_size"]))
    return trainer, rates


def a_result(**fields: Any) -> Any:
    """A complete PlanResult (the OpenAPI example's) with `fields` replaced: what a worker
    hands the store when a plan succeeds."""
    from service.schemas.examples import RESULT_EXAMPLE
    from service.schemas.result import PlanResult

    return PlanResult.model_validate(RESULT_EXAMPLE | fields)


TEARDOWN_ABORT = "terminate called without an active exception"


def run_on_gloo(script: str, tmp_path: Path, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    """A rendered training script (trainplan's own text, never a request's) run by torchrun
    with `ranks` CPU processes on gloo; fails the test unless it exits cleanly."""
    path = tmp_path / "train.py"
    path.write_text(script)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for _ in range(3):
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        # gloo now and then aborts a rank as it tears down ("terminate called without an
        # active exception", seen once in five full runs on a 2-core box): run it again;
        # any other failure, or that one three times, fails the test
        if run.returncode == 0 or TEARDOWN_ABORT not in run.stderr:
            break
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def with_changes(raw: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """`raw` with each `a__b__c=value` set at raw["a"]["b"]["c"] (in place; returned)."""
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = raw
        for key in parents:
            node = node[key]
        node[leaf] = value
    return raw


@contextmanager
def served(settings: Any) -> Iterator[str]:
    """The app for `settings` served by uvicorn in a thread on a free loopback port, for
    clients that are real processes (SkyPilot's policy client, curl from a Slurm hook);
    yields "127.0.0.1:port"."""
    import threading
    import time

    import uvicorn

    from service.api.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# SkyPilot's client lives in a venv of its own (`make install`): it pins click and uvicorn
# below the service's.
SKY_PYTHON = Path(__file__).resolve().parents[1] / ".venv-sky" / "bin" / "python"


def hook_settings(db_url: str, token: str) -> Settings:
    """A service for a scheduler's hook to call: keys required (the shared-token mode), no
    embedded worker (a test runs the plan when it wants it done), a short admission wait."""
    return Settings(
        database_url=db_url,
        embedded_worker=False,
        admission_wait_seconds=0.2,
        auth_mode="token",
        api_tokens=[token],
    )


def run_queued_plan(settings: Settings) -> None:
    """Run the one plan queued in the settings' store to its end, on a worker in this process."""
    from service.store.db import make_engine, make_session_factory
    from workers.loop import PlanWorker

    factory = make_session_factory(make_engine(settings.database_url))
    assert PlanWorker(settings, factory, "w-test").run_once() == 1
