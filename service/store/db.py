"""Engine and session factory for the configured database URL (SQLite or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from prometheus_client import Counter
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

# How hard this process works the database: the change feed's promise (load that grows with
# changes, not with waiting clients) is read off this counter by bench/fanout.py.
STATEMENTS = Counter("trainplan_db_statements", "SQL statements this process sent to the store")


def count_statement(*_: Any) -> None:
    STATEMENTS.inc()


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (the only driver installed)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    event.listen(engine, "before_cursor_execute", count_statement)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Any:
    """Alembic's configuration, built here rather than read from an ini file: the migrations
    are the installed package `service.store.migrations` (the repository's `migrations/`,
    mapped in by setup.py), found wherever the package is installed and whatever the working
    directory."""
    config = Config()
    config.set_main_option("script_location", str(files("service.store.migrations")))
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return config


def upgrade(url: str) -> None:
    """Apply every Alembic migration to the database at `url`."""
    command.upgrade(alembic_config(url), "head")


def current_revision(url: str) -> str | None:
    """The store's Alembic revision (None: never migrated)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision the installed migrations know."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
