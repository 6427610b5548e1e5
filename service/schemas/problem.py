"""RFC 9457 problem details: the one shape every error takes, whoever reports it (the API, the
worker loop, a plan's child process), so none of them needs the SQL layer to build one."""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://trainplan.dev/problems/"


def problem(kind: str, title: str, detail: str, status: int, **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem-details object."""
    return {
        "type": f"{PROBLEM_BASE}{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
