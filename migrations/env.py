"""Alembic environment: the URL comes from the caller (trainplan db upgrade) or TRAINPLAN_."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from service.store.db import normalise_url
from service.store.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url or url == "sqlite:///./trainplan.db":
        from service.config import get_settings

        url = get_settings().database_url
    return normalise_url(url)


def run_offline() -> None:
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
