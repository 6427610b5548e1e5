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

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize(
    "command",
    [
        ["db", "upgrade"],
        ["db", "current"],
        ["worker"],
        ["worker-health"],
        ["serve"],
        ["plan"],
        ["gpus"],
    ],
)
def test_cli_commands_exist(command: list[str]) -> None:
    _assert_real_command(["trainplan", *command])


def _version() -> str:
    import tomllib

    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_compose_and_manifests_run_one_image_tagged_with_the_version() -> None:
    wanted = f"trainplan:{_version()}"
    images = {name: s["image"] for name, s in _compose()["services"].items() if name != "db"}
    assert set(images.values()) == {wanted}, images
    for doc in _manifests():
        if doc["kind"] in ("Deployment", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container["image"] == wanted, doc["metadata"]["name"]


def test_the_worker_health_checks_read_the_heartbeat() -> None:
    """The compose check was `os.path.exists('/proc/1')`, true whatever the worker did."""
    worker = _compose()["services"]["worker"]
    assert worker["healthcheck"]["test"] == ["CMD", "trainplan", "worker-health"]
    assert worker["environment"]["TRAINPLAN_HEARTBEAT_FILE"]
    (deployment,) = [d for d in _manifests() if d["metadata"]["name"] == "trainplan-worker"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["exec"]["command"] == ["trainplan", "worker-health"]
    assert "TRAINPLAN_HEARTBEAT_FILE" in {e["name"] for e in container["env"]}


def test_the_image_installs_the_serving_lock_and_the_package_not_the_tree() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install -r /tmp/requirements/serve.txt" in text
    assert "pip install --no-deps /tmp/src && rm -rf /tmp/src" in text
    assert "alembic.ini" not in text  # the migrations' configuration is inside the package


def test_make_compose_check_runs_something_that_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("compose-check: install\n", 1)[1].splitlines()[0]
    paths = [w for w in recipe.split() if "/" in w and not w.startswith("$(")]
    assert paths and all((ROOT / p).exists() for p in paths), recipe


def test_the_lock_files_pin_every_requirement() -> None:
    for name in ("serve.txt", "dev.txt"):
        lines = (ROOT / "requirements" / name).read_text().splitlines()
        pins = [ln for ln in lines if ln and not ln.lstrip().startswith("#")]
        assert pins and all("==" in ln for ln in pins), name
        assert "torch==2.14.1" in pins
    serve = (ROOT / "requirements" / "serve.txt").read_text()
    for test_tool in ("pytest==", "playwright==", "deepspeed==", "schemathesis=="):
        assert test_tool not in serve


@pytest.mark.parametrize("age, code", [(1.0, 0), (120.0, 1), (None, 1)])
def test_worker_health_reads_the_heartbeat_files_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, age: float | None, code: int
) -> None:
    import os
    import time

    from service.config import get_settings

    beat = tmp_path / "alive"
    if age is not None:
        beat.touch()
        os.utime(beat, (time.time() - age, time.time() - age))
    monkeypatch.setenv("TRAINPLAN_HEARTBEAT_FILE", str(beat))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["worker-health"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == code, result.output


def test_the_worker_touches_its_heartbeat_file(tmp_path: Path) -> None:
    import threading

    from service.config import Settings
    from service.store.db import make_engine, make_session_factory, upgrade
    from workers.loop import PlanWorker

    url = f"sqlite:///{tmp_path}/store.db"
    upgrade(url)
    beat = tmp_path / "alive"
    settings = Settings(
        database_url=url, heartbeat_file=beat, heartbeat_seconds=0.05, poll_seconds=0.05
    )
    worker = PlanWorker(settings, make_session_factory(make_engine(url)))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        for _ in range(200):
            if beat.exists():
                break
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert beat.exists()
