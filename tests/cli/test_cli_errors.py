"""The CLI's failures are one clear line and a non-zero exit, never a traceback (issue 24: no
server printed 253 lines, a missing file 37, an engine failure under --local a rich traceback
and a non-JSON stdout under --json)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.helpers import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "examples" / "small-cnn.json"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def test_no_server_is_one_line_with_what_to_do() -> None:
    result = _run("plan", str(SPEC), "--server", f"http://127.0.0.1:{_closed_port()}")
    assert result.exit_code == 3
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Cannot reach the server") and "--local" in line


def test_a_missing_spec_file_is_one_line() -> None:
    result = _run("plan", "/no/such/spec.json", "--local")
    assert result.exit_code == 2
    assert result.stderr.strip() == "No such spec file: /no/such/spec.json"


def test_an_invalid_spec_under_json_keeps_stdout_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"source": "layers", "layers": []}}))
    result = _run("plan", str(bad), "--local", "--json")
    assert result.exit_code == 2
    body = json.loads(result.stdout)
    assert body["status"] == "failed" and body["error"]["errors"]


def test_an_engine_failure_under_local_json_is_a_problem_on_stdout(tmp_path: Path) -> None:
    """A Mixtral config printed a rich traceback and no JSON on stdout."""
    pytest.importorskip("transformers")
    spec = {
        "model": {
            "source": "transformers",
            "architecture": "MixtralForCausalLM",
            "config": TINY_LLAMA | {"num_local_experts": 4, "num_experts_per_tok": 2},
        },
        "data": {"kind": "tokens", "seq_len": 32, "num_samples": 100},
        "training": {"precision": "bf16-mixed", "global_batch_size": 8},
        "device": {"kind": "simulated", "gpu": "A100-80GB"},
        "search": {"what_if": False},
    }
    path = tmp_path / "mixtral.json"
    path.write_text(json.dumps(spec))
    result = _run("plan", str(path), "--local", "--json")
    body = json.loads(result.stdout)
    if body["status"] == "succeeded":  # MoE plans for real once issue 27 lands
        return
    assert result.exit_code == 2
    assert body["error"]["type"].endswith("/unsupported")
    assert "MixtralExperts" in body["error"]["detail"]
    assert len(result.stderr.strip().splitlines()) == 1


def test_keys_list_keeps_id_and_prefix_whole_at_80_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`keys revoke` needs the prefix; at 80 columns the table cut it short."""
    from service.config import get_settings

    monkeypatch.setenv("TRAINPLAN_DATABASE_URL", f"sqlite:///{tmp_path}/keys.db")
    monkeypatch.setenv("COLUMNS", "80")
    get_settings.cache_clear()
    try:
        created = _run("keys", "create", "--tenant", "a-rather-long-tenant-name", "--scope",
                       "submit,read,admin")  # fmt: skip
        listed = _run("keys", "list")
    finally:
        get_settings.cache_clear()
    key = created.stdout.strip()
    prefix = key[:10]
    assert prefix in listed.stdout, listed.stdout
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80
