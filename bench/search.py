"""trainplan's search against the peers people use, each run for real against the same oracle.

.venv/bin/python -m bench.search [--quick]
.venv/bin/python -m bench.search --device cpu [--budget-gib 0.25]   # seeded vs blind, real CPU

The oracle is trainplan's simulated device: `fits(b)` traces one steady-state iteration at micro-
batch b on the card and compares its peak with the card's memory. Each method gets a fresh session
and sees only OOM or success:
- trainplan: `find_max_batch` with the simulated device's prediction (the allocator replayed on
  the allocation sequence extrapolated from the trials so far; not a trial), confirmed by trials,
  with the secant + bisection safeguards; stops when b fits and b + 1 does not;
- Accelerate: `accelerate.utils.find_executable_batch_size`, started at the bound, retried on
  a RuntimeError whose message is CUDA's out-of-memory text (what it catches in practice);
- Lightning: `Tuner.scale_batch_size` in `power` and `binsearch` modes (steps_per_trial=1,
  init_val=2, max_val=the bound, its default margin), driving a real `Trainer.fit` whose training
  step raises the same out-of-memory error when the oracle says the batch does not fit.
`exact` means the method returned the true maximum (checked: it fits, one more does not).
Writes bench/results/search.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.machine import header
from service.schemas.examples import GRAY_CNN_MODEL as GRAY_CNN
from service.schemas.examples import MLP_MODEL as SMALL_MLP
from service.schemas.examples import WIDE_MLP_MODEL as MLP
from service.schemas.spec import PlanSpec
from workers import engine
from workers.engine.compiled import compile_job
from workers.engine.devices import open_device, open_session
from workers.engine.search import find_max_batch

BOUND = 65536
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (oracle)"


def image(size: int, channels: int = 3, classes: int = 1000) -> dict[str, Any]:
    kind = {"kind": "image", "channels": channels, "height": size, "width": size}
    return kind | {"num_classes": classes}


def vision(name: str) -> dict[str, Any]:
    return {"source": "torchvision", "name": name}


ZOO: dict[str, dict[str, Any]] = {
    "mlp 4096 adam fp32": {
        "model": MLP,
        "data": {"kind": "tensor", "shape": [2048], "num_classes": 10},
        "training": {"optimizer": "adam"},
    },
    "cnn 28x28 gray fp32": {
        "model": GRAY_CNN,
        "data": image(28, 1, 10),
        "training": {"optimizer": "sgd_momentum"},
    },
    "resnet18 112px bf16-mixed": {
        "model": vision("resnet18"),
        "data": image(112),
        "training": {"optimizer": "sgd_momentum", "precision": "bf16-mixed"},
    },
    "resnet50 224px bf16-mixed": {
        "model": vision("resnet50"),
        "data": image(224),
        "training": {"optimizer": "sgd_momentum", "precision": "bf16-mixed"},
    },
    "mobilenet_v3_large 224px adamw": {
        "model": vision("mobilenet_v3_large"),
        "data": image(224),
        "training": {"optimizer": "adamw"},
    },
    "vit_b_16 224px bf16-mixed adamw": {
        "model": vision("vit_b_16"),
        "data": image(224),
        "training": {"optimizer": "adamw", "precision": "bf16-mixed"},
    },
    "gpt2 seq 512 bf16-mixed adamw": {
        "model": {"source": "transformers", "preset": "gpt2"},
        "data": {"kind": "tokens", "seq_len": 512},
        "training": {"optimizer": "adamw", "precision": "bf16-mixed"},
    },
    "bert-base seq 128 bf16-mixed adamw": {
        "model": {"source": "transformers", "preset": "bert-base-uncased"},
        "data": {"kind": "tokens", "seq_len": 128},
        "training": {"optimizer": "adamw", "precision": "bf16-mixed"},
    },
}
CARDS = ["T4", "A10", "A100-80GB"]
QUICK = ["cnn 28x28 gray fp32", "resnet18 112px bf16-mixed"]


def spec_of(case: dict[str, Any], gpu: str) -> PlanSpec:
    precision = case["training"].get("precision", "fp32")
    training = dict(case["training"])
    if gpu == "T4" and precision.startswith("bf16"):
        training["precision"] = "fp16-mixed"  # T4 has no bf16
    return PlanSpec.model_validate(
        {
            "model": case["model"],
            "data": {"num_samples": 1_000_000, **case["data"]},
            "training": training,
            "device": {"kind": "simulated", "gpu": gpu},
            "search": {"max_batch_size": BOUND, "what_if": False},
        }
    )


class Oracle:
    """One fresh simulated session on a thread of its own (FakeTensorMode and the tracker are
    thread-local, so the peers' real Trainer code runs untouched on the calling thread);
    counts the probes a method asks for."""

    def __init__(self, spec: PlanSpec) -> None:
        self.spec = spec
        self.device = open_device(compile_job(spec))
        self.calls: list[tuple[int, bool]] = []
        self.requests: queue.Queue[int | None] = queue.Queue()
        self.answers: queue.Queue[Any] = queue.Queue()
        self.limit = 0
        self.session: Any = None

    def _serve(self) -> None:
        with open_session(self.device, compile_job(self.spec)) as session:
            self.session = session
            self.answers.put(session.limit_bytes)
            while (batch := self.requests.get()) is not None:
                self.answers.put(session.probe(batch))

    def run(self, method: Callable[[Oracle], int]) -> dict[str, Any]:
        server = threading.Thread(target=self._serve, daemon=True)
        server.start()
        self.limit = self.answers.get()
        try:
            start = time.perf_counter()
            found = method(self)
            wall = time.perf_counter() - start
        finally:
            self.requests.put(None)
            server.join()
        return {"found": found, "trials": len(self.calls), "wall_s": wall, "probes": self.calls}

    def probe(self, batch: int) -> Any:
        self.requests.put(batch)
        outcome = self.answers.get()
        self.calls.append((batch, outcome.fits))
        return outcome

    def predict(self, batch: int) -> bool | None:
        """trainplan's allocator-replay prediction (no trace, not a trial): pure Python on
        the sequences already traced, so it runs on the calling thread."""
        return self.session.predict_fits(batch)

    def fits(self, batch: int) -> bool:
        return bool(self.probe(batch).fits)

    def step(self, batch: int) -> None:
        """A training step as a framework sees it: returns, or raises CUDA's OOM error."""
        if not self.fits(batch):
            raise RuntimeError(OOM)


def trainplan(oracle: Oracle) -> int:
    return find_max_batch(oracle.probe, oracle.limit, BOUND, oracle.predict).max_batch


def accelerate(oracle: Oracle) -> int:
    from accelerate.utils import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=BOUND)
    def train(batch_size: int) -> int:
        oracle.step(batch_size)
        return batch_size

    try:
        return int(train())
    except RuntimeError:  # reached zero: not even one sample fits
        return 0


def lightning(mode: str) -> Callable[[Oracle], int]:
    def run(oracle: Oracle) -> int:
        import lightning.pytorch as pl

        scratch = tempfile.mkdtemp(prefix="trainplan-bench-")

        class Probe(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.batch_size = 2
                self.weight = torch.nn.Parameter(torch.zeros(1))

            def train_dataloader(self) -> Any:
                data = torch.utils.data.TensorDataset(torch.zeros(2 * BOUND + 1, 1))
                return torch.utils.data.DataLoader(data, batch_size=self.batch_size)

            def training_step(self, batch: Any, _: int) -> torch.Tensor:
                oracle.step(batch[0].shape[0])
                return (self.weight * batch[0]).sum()

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.0)

        trainer = pl.Trainer(
            default_root_dir=scratch,  # the finder checkpoints the model there and back
            accelerator="cpu",
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        found = pl.tuner.Tuner(trainer).scale_batch_size(
            Probe(), mode=mode, steps_per_trial=1, init_val=2, max_trials=25, max_val=BOUND
        )
        shutil.rmtree(scratch, ignore_errors=True)
        return int(found or 0)

    return run


METHODS: dict[str, Callable[[Oracle], int]] = {
    "trainplan": trainplan,
    "accelerate": accelerate,
    "lightning-power": lightning("power"),
    "lightning-binsearch": lightning("binsearch"),
}


def truth(spec: PlanSpec, answer: int) -> int:
    """Check trainplan's answer with fresh probes (fits, and one more does not)."""
    oracle = Oracle(spec)

    def check(o: Oracle) -> int:
        assert o.fits(answer) or answer == 0
        if answer < BOUND:
            assert not o.fits(answer + 1)
        return answer

    oracle.run(check)
    return answer


# Real CPU steps under a memory budget: small models, so a real trial takes about a second.
CPU_ZOO: dict[str, dict[str, Any]] = {
    "mlp 1024 sgd-momentum": {
        "model": SMALL_MLP,
        "data": {"kind": "tensor", "shape": [512], "num_classes": 10},
        "training": {"optimizer": "sgd_momentum"},
    },
    "mlp 1024 adam": {
        "model": SMALL_MLP,
        "data": {"kind": "tensor", "shape": [512], "num_classes": 10},
        "training": {"optimizer": "adam"},
    },
    "cnn 28x28 gray adam": {
        "model": GRAY_CNN,
        "data": image(28, channels=1, classes=10),
        "training": {"optimizer": "adam"},
    },
    "resnet18 64px sgd-momentum": {
        "model": {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
        "data": image(64, classes=10),
        "training": {"optimizer": "sgd_momentum"},
    },
    "mobilenet_v3_small 64px adamw": {
        "model": {
            "source": "torchvision",
            "name": "mobilenet_v3_small",
            "kwargs": {"num_classes": 10},
        },
        "data": image(64, classes=10),
        "training": {"optimizer": "adamw"},
    },
    "tiny gpt2 seq 64 adamw": {
        "model": {
            "source": "transformers",
            "architecture": "GPT2LMHeadModel",
            "config": {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 4096},
        },
        "data": {"kind": "tokens", "seq_len": 64},
        "training": {"optimizer": "adamw"},
    },
}


def cpu_rows(budget_gib: float) -> list[dict[str, Any]]:
    """The seeded search on the real `cpu` device against the blind one: real trials (search
    probes only), the answer, and exactness checked by fresh real probes."""

    rows = []
    for name, case in CPU_ZOO.items():
        row: dict[str, Any] = {"model": name, "budget_gib": budget_gib}
        for seeded in (True, False):
            spec = PlanSpec.model_validate(
                {
                    "model": case["model"],
                    "data": {"num_samples": 50_000, **case["data"]},
                    "training": {"global_batch_size": 64, **case["training"]},
                    "device": {"kind": "cpu", "memory_gib": budget_gib},
                    "search": {
                        "headroom": 0.0,
                        "what_if": False,
                        "max_batch_size": BOUND,
                        "seed_from_simulation": seeded,
                    },
                }
            )
            start = time.perf_counter()
            result = engine.plan(spec)
            wall = time.perf_counter() - start
            label = "seeded" if seeded else "blind"
            row[f"{label}_max"] = result.max_micro_batch_size
            row[f"{label}_trials"] = len([t for t in result.trials if t.phase == "search"])
            row[f"{label}_wall_s"] = wall
            if seeded and result.prediction is not None:
                row["predicted_max"] = result.prediction.predicted_max_micro_batch_size
                row["simulated_trials"] = result.prediction.simulated_trials
                row["simulated_wall_s"] = result.prediction.simulated_wall_s
                answer = result.max_micro_batch_size
                device = open_device(compile_job(spec))
                with open_session(device, compile_job(spec)) as session:
                    row["exact"] = session.probe(answer).fits and not session.probe(answer + 1).fits
        rows.append(row)
        print(
            f"{name:32} predicted {row.get('predicted_max')!s:>6} real {row['seeded_max']:>6} "
            f"exact {row.get('exact')!s:>5}; real trials seeded {row['seeded_trials']} "
            f"({row['seeded_wall_s']:.1f} s, twin {row.get('simulated_wall_s', 0):.1f} s) vs "
            f"blind {row['blind_trials']} ({row['blind_wall_s']:.1f} s)",
            flush=True,
        )
    seeded = [r["seeded_trials"] for r in rows]
    blind = [r["blind_trials"] for r in rows]
    print(
        f"real trials: seeded median {statistics.median(seeded)} (mean "
        f"{statistics.fmean(seeded):.2f}), blind median {statistics.median(blind)} (mean "
        f"{statistics.fmean(blind):.2f}); exact {sum(bool(r.get('exact')) for r in rows)}/"
        f"{len(rows)}; same answer seeded and blind "
        f"{sum(r['seeded_max'] == r['blind_max'] for r in rows)}/{len(rows)}"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two models, for a smoke run")
    parser.add_argument("--device", choices=["simulated", "cpu"], default="simulated")
    parser.add_argument("--budget-gib", type=float, default=0.25, help="cpu device budget")
    parser.add_argument(
        "--resume", action="store_true", help="keep the (model, card) rows already in the JSON"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # Lightning narrates every trial at INFO
    warnings.filterwarnings("ignore")
    print(header(), flush=True)
    if args.device == "cpu":
        rows = cpu_rows(args.budget_gib)
        out = Path(__file__).parent / "results" / "search_cpu.json"
        out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2))
        return
    names = QUICK if args.quick else list(ZOO)
    out = Path(__file__).parent / "results" / ("search_quick.json" if args.quick else "search.json")
    rows: list[dict[str, Any]] = []
    if args.resume and out.exists():
        rows = json.loads(out.read_text())["rows"]
    done = {(r["model"], r["card"]) for r in rows}
    print(
        f"{'model':36} {'card':10} {'method':20} {'found':>6} {'exact':>6} {'trials':>6} {'s':>7}"
    )
    for name in names:
        for gpu in CARDS:
            if (name, gpu) in done:
                continue
            spec = spec_of(ZOO[name], gpu)
            results = {m: Oracle(spec).run(fn) for m, fn in METHODS.items()}
            true_max = truth(spec, results["trainplan"]["found"])
            for method, r in results.items():
                row = {"model": name, "card": gpu, "method": method, "true_max": true_max, **r}
                row["exact"] = r["found"] == true_max
                row["fits"] = r["found"] <= true_max
                rows.append(row)
                print(
                    f"{name:36} {gpu:10} {method:20} {r['found']:>6} {row['exact']!s:>6} "
                    f"{r['trials']:>6} {r['wall_s']:>7.2f}",
                    flush=True,
                )
            # saved after every card: a long run that stops keeps what it measured (--resume)
            out.write_text(json.dumps({"header": header(), "rows": rows}, indent=2))
    print()
    print(
        f"{'method':20} {'exact':>9} {'median trials':>14} {'median s':>9} {'vs trainplan s':>15}"
    )
    base = {(r["model"], r["card"]): r["wall_s"] for r in rows if r["method"] == "trainplan"}
    summary = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        ratio = statistics.median(base[(r["model"], r["card"])] / r["wall_s"] for r in mine)
        summary[method] = {
            "exact": sum(r["exact"] for r in mine),
            "cases": len(mine),
            "median_trials": statistics.median(r["trials"] for r in mine),
            "median_wall_s": statistics.median(r["wall_s"] for r in mine),
            "median_found_over_true": statistics.median(
                r["found"] / r["true_max"] for r in mine if r["true_max"]
            ),
            "median_trainplan_time_ratio": ratio,
        }
        s = summary[method]
        print(
            f"{method:20} {s['exact']:>4}/{s['cases']:<4} {s['median_trials']:>14} "
            f"{s['median_wall_s']:>9.2f} {ratio:>14.2f}x"
        )
    out.write_text(json.dumps({"header": header(), "summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
