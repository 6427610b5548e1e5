"""Docker does not run on this machine, so the container files are linted here instead of
`docker compose config`: they parse, every service has a health check, the worker reserves a GPU,
and every command they run is a real `trainplan` command."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from service.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def _manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((ROOT / "deploy").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _assert_real_command(argv: list[str]) -> None:
    assert argv[0] == "trainplan", argv
    result = CliRunner().invoke(app, [*argv[1:], "--help"])
    assert result.exit_code == 0, (argv, result.output)


def test_compose_services_and_health_checks() -> None:
    services = _compose()["services"]
    assert {"db", "api", "worker"} <= set(services)
    for name in ("db", "api", "worker"):
        assert "healthcheck" in services[name], name
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in ("migrate", "api", "worker"):
        _assert_real_command(services[name]["command"])
        env = services[name]["environment"]
        assert env["TRAINPLAN_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_kubernetes_manifests() -> None:
    docs = _manifests()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "trainplan-api") in kinds
    assert ("Service", "trainplan-api") in kinds
    assert ("Deployment", "trainplan-worker") in kinds
    assert ("Job", "trainplan-migrate") in kinds
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            _assert_real_command(container["args"])
            if doc["metadata"]["name"] == "trainplan-worker":
                assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_dockerfile_runs_a_real_command_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "\nUSER " in text
    cmd = next(line for line in text.splitlines() if line.startswith("CMD "))
    argv = yaml.safe_load(cmd[4:])
    _assert_real_command(argv)
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in shlex.split(line)[1:-1]:
                assert (ROOT / src).exists(), src


@pytest.mark.parametrize("command", [["db", "upgrade"], ["worker"], ["serve"], ["plan"], ["gpus"]])
def test_cli_commands_exist(command: list[str]) -> None:
    _assert_real_command(["trainplan", *command])
