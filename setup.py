"""Packages for setuptools; everything else is in pyproject.toml.

The migrations live at the repository's top level (`migrations/`, where `alembic` and the docs
expect them) and travel inside the installed package as `service.store.migrations`, so a wheel
can `trainplan db upgrade` from any working directory. pyproject.toml cannot map a folder
outside the package tree into it while also finding packages, hence this file."""

from setuptools import find_packages, setup

MIGRATIONS = {"service.store.migrations": "migrations"}

setup(
    packages=[
        *find_packages(include=["service*", "workers*"]),
        "service.store.migrations",
        "service.store.migrations.versions",
    ],
    package_dir={
        **MIGRATIONS,
        "service.store.migrations.versions": "migrations/versions",
    },
)
