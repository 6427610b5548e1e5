"""Shared fixtures: a database URL for each backend (every storage test runs on both)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from copy import deepcopy
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from service.api.app import create_app
from service.config import Settings
from service.schemas.examples import SMALL_GRAYSCALE_CNN

PG_URL = os.environ.get("TRAINPLAN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_admin_url() -> str:
    return PG_URL.replace("postgresql://", "postgresql+psycopg://", 1)


def _pg_available() -> bool:
    try:
        engine = create_engine(_pg_admin_url())
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/trainplan.db"
        return
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL} (CI must test it)")
        pytest.skip("PostgreSQL is not reachable")
    name = f"tp_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_pg_admin_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = PG_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    """The API on each database, without its embedded worker (plans stay queued)."""
    settings = Settings(database_url=db_url, embedded_worker=False, max_body_bytes=64 * 1024)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def small_spec() -> dict[str, Any]:
    """The grayscale CNN on a 1 GiB simulated card: a plan takes about a second."""
    spec = deepcopy(SMALL_GRAYSCALE_CNN)
    spec["device"] = {"kind": "simulated", "memory_gib": 1.0}
    # what-if searches are tested on their own (tests/engine/test_what_if.py); elsewhere they
    # only add time
    spec["search"] = {"max_batch_size": 65536, "headroom": 0.0, "what_if": False}
    return spec


PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make the test model factories visible here and in every child process."""
    import sys

    monkeypatch.syspath_prepend(PLUGINS)
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", PLUGINS + (os.pathsep + path if path else ""))
    monkeypatch.setattr(sys, "path", [PLUGINS, *sys.path])
    return PLUGINS


# CI runs property tests from a fixed seed, so a red run is reproducible; a local run explores.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say where the dashboard's browser tests left their screenshots (look at them)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(__file__)), "build", "screenshots")
    if os.path.isdir(folder) and os.listdir(folder):
        terminalreporter.write_line(f"dashboard screenshots: {folder}")
