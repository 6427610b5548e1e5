"""`trainplan plan --local` shows the long-context parts of a plan: evaluation, token batching
and what the plan cost."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from service.cli import app
from service.schemas.examples import TINY_LLAMA


def plan_table(tmp_path: Path, spec: dict[str, Any]) -> str:
    """`trainplan plan SPEC --local` on a wide terminal: its table."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    result = CliRunner().invoke(app, ["plan", str(path), "--local"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_table_shows_evaluation_batching_and_traces(tmp_path: Path) -> None:
    spec = {
        "model": {
            "source": "transformers",
            "architecture": "LlamaForCausalLM",
            "config": TINY_LLAMA | {"max_position_embeddings": 1024},
        },
        "data": {
            "kind": "tokens",
            "seq_len": 512,
            "vocab_size": 1000,
            "num_samples": 1000,
            "lengths": {"percentiles": {"50": 100, "100": 512}},
            "batching": "packed",
        },
        "training": {"global_batch_size": 64, "evaluation": {"num_samples": 100}},
        "device": {"kind": "simulated", "memory_gib": 1},
        "search": {"what_if": False},
    }
    table = plan_table(tmp_path, spec)
    lines = table.splitlines()
    batching = next(line for line in lines if "token batching" in line)
    assert "packed" in batching and "0% padding" in batching and "count rows" in batching
    assert any("evaluation micro-batch" in line for line in lines)
    traced = re.search(r"traced steps\W+(\d+)", table)
    assert traced is not None and int(traced.group(1)) > 0
    # a simulated plan's estimate comes with its band and its chance of running out of memory
    speed = next(line for line in lines if "throughput" in line)
    assert "samples/s (estimate; 75% band " in speed
    risk = re.search(r"out-of-memory risk\W+([\d.]+)% at micro-batch (\d+), ([\d.]+)% at", table)
    assert risk is not None and float(risk.group(1)) <= float(risk.group(3)) <= 1.0


def test_the_table_says_how_the_stack_was_traced(tmp_path: Path) -> None:
    spec = {
        "model": {
            "source": "transformers",
            "architecture": "LlamaForCausalLM",
            "config": TINY_LLAMA | {"num_hidden_layers": 8},
        },
        "data": {"kind": "tokens", "seq_len": 64, "vocab_size": 1000, "num_samples": 1000},
        "training": {"global_batch_size": 64},
        "device": {"kind": "simulated", "memory_gib": 1},
        "search": {"what_if": False},
    }
    row = next(line for line in plan_table(tmp_path, spec).splitlines() if "depth folding" in line)
    assert "8 blocks from traces of 2-5 blocks" in row


def llama_row(tmp_path: Path, label: str, seq_len: int, **training: Any) -> str:
    """The table row `label` of a tiny Llama's plan with `training`."""
    return row_of(llama_table(tmp_path, seq_len, **training), label)


def row_of(table: str, label: str) -> str:
    return next(line for line in table.splitlines() if label in line)


def llama_table(tmp_path: Path, seq_len: int, **training: Any) -> str:
    spec = {
        "model": {
            "source": "transformers",
            "architecture": "LlamaForCausalLM",
            "config": TINY_LLAMA,
        },
        "data": {"kind": "tokens", "seq_len": seq_len, "vocab_size": 1000, "num_samples": 1000},
        "training": {"global_batch_size": 64} | training,
        "device": {"kind": "simulated", "memory_gib": 1},
        "search": {"what_if": False},
    }
    return plan_table(tmp_path, spec)


def test_the_table_shows_activation_offload_and_the_recompute(tmp_path: Path) -> None:
    offload = {"gradient_checkpointing": True, "checkpointing": {"offload": True}}
    table = llama_table(tmp_path, 64, **offload)
    row = row_of(table, "activation offload")
    assert "pinned on the host" in row and "over PCIe per step" in row
    row = row_of(table, "recompute")
    assert "s per step: checkpointed blocks make" in row and "again in backward" in row


def test_the_table_shows_the_context_parallel_ring(tmp_path: Path) -> None:
    layout = {"world_size": 2, "parallelism": {"strategy": "fsdp", "context_parallel": 2}}
    row = llama_row(tmp_path, "context parallelism", 256, **layout)
    assert "ring over" in row and "per step per rank" in row


def test_the_table_shows_the_tensor_parallel_all_reduces(tmp_path: Path) -> None:
    layout = {"world_size": 2, "parallelism": {"strategy": "fsdp", "tensor_parallel": 2}}
    row = llama_row(tmp_path, "tensor parallelism", 64, **layout)
    assert "all-reduces move" in row and "per step per rank" in row


def test_the_table_shows_the_layout_choice(tmp_path: Path) -> None:
    layout = {"world_size": 2, "parallelism": {"layout": "auto"}}
    row = llama_row(tmp_path, "layout", 64, **layout)
    assert "auto: shortest time to train of tp1 cp1" in row and "tp2 cp1" in row


def test_the_table_shows_the_checkpointing_choice(tmp_path: Path) -> None:
    auto = {"global_batch_size": 8, "checkpointing": {"auto": True}}
    row = llama_row(tmp_path, "checkpointing", 64, **auto)
    assert "least recompute reaching micro-batch 8" in row and "full+offload" in row
