"""The package as a platform installs it: a wheel built from this tree, installed into a fresh
venv, run from a directory with no source in it. Migrations must travel inside the wheel, and
`db upgrade`, `serve` and a plan over HTTP must work from there (issue 24: the image's
`pip install .` could neither migrate nor serve, and only file lints covered it).

The temporary venv gets the wheel itself, with no dependencies; its dependencies are those of
the venv running the tests (a `.pth` line names that venv's site-packages), so the test needs
no network and no second copy of torch. The path line does not run that venv's own `.pth` files,
so this checkout's editable install is not importable there: `service` can only come from the
wheel, which the test checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("trainplan-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel; returns its bin folder."""
    home = tmp_path_factory.mktemp("venv")
    venv.create(home, with_pip=False)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(home), "platbase": str(home)}))
    (purelib / "_trainplan_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(home / "bin" / "python"), "install",
         "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return home / "bin"


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory with neither source, migrations nor alembic.ini in it."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def _env(db_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINPLAN_", "PYTHON"))}
    return env | {"TRAINPLAN_DATABASE_URL": db_url, "TRAINPLAN_POLL_SECONDS": "0.1", **extra}


def _run(bin_dir: Path, cwd: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(bin_dir / "trainplan"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, (args, done.stdout, done.stderr[-3000:])
    return done.stdout + done.stderr


def test_the_wheel_carries_the_migrations(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "service/store/migrations/env.py" in names
    assert "service/store/migrations/script.py.mako" in names
    revisions = sorted(n for n in names if n.startswith("service/store/migrations/versions/0"))
    assert len(revisions) == len(list((ROOT / "migrations" / "versions").glob("0*.py")))


def test_the_venv_imports_the_wheel_not_this_checkout(installed: Path, elsewhere: Path) -> None:
    found = subprocess.run(
        [str(installed / "python"), "-c", "import service; print(service.__file__)"],
        cwd=elsewhere, env=_env("sqlite://"), capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(found).is_relative_to(installed.parent), found


def test_db_upgrade_from_the_wheel(installed: Path, elsewhere: Path, db_url: str) -> None:
    env = _env(db_url)
    assert "latest revision" in _run(installed, elsewhere, env, "db", "upgrade")
    current = _run(installed, elsewhere, env, "db", "current")
    assert current.startswith("current ") and current.split()[1].rstrip(",") != "none"
    assert list(elsewhere.iterdir()) == []  # nothing written where it was run


@pytest.fixture
def served(installed: Path, elsewhere: Path, db_url: str) -> Iterator[str]:
    """`trainplan serve` (embedded worker) from the wheel's venv, working directory elsewhere."""
    port = free_port()
    env = _env(db_url, TRAINPLAN_PORT=str(port), TRAINPLAN_HEARTBEAT_SECONDS="0.5")
    proc = subprocess.Popen(
        [str(installed / "trainplan"), "serve"],
        cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail("the installed server did not become ready in 120 s")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_serve_and_plan_over_http_from_the_wheel(served: str) -> None:
    spec: dict[str, Any] = json.loads((ROOT / "examples" / "small-cnn.json").read_text())
    spec["search"] = {"what_if": False}  # the what-ifs are tested elsewhere; here they add time
    submitted = httpx.post(served + "/v1/plans", json=spec, timeout=30)
    assert submitted.status_code == 202, submitted.text
    plan_id = submitted.json()["id"]
    body = httpx.get(f"{served}/v1/plans/{plan_id}", params={"wait": 60}, timeout=90).json()
    deadline = time.monotonic() + 120
    while body["status"] in ("queued", "running") and time.monotonic() < deadline:
        body = httpx.get(f"{served}/v1/plans/{plan_id}", params={"wait": 30}, timeout=60).json()
    assert body["status"] == "succeeded", body.get("error")
    assert body["result"]["max_micro_batch_size"] >= 1
