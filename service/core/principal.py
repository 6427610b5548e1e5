"""The caller, as the routes see it: a tenant and what its key may do."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

SCOPES = ("submit", "read", "admin")
DEFAULT_TENANT = "default"
KEY_PREFIX = "tp_"


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[str]
    key_id: str | None = None

    @property
    def sees_all(self) -> bool:
        """An admin key's reads span every tenant (cross-tenant views)."""
        return "admin" in self.scopes

    @property
    def tenant_filter(self) -> str | None:
        """The tenant a query is confined to (None: all of them)."""
        return None if self.sees_all else self.tenant


# No auth (loopback `make serve`) or the legacy shared tokens: one tenant, every scope.
EVERYONE = Principal(DEFAULT_TENANT, frozenset(SCOPES))


def new_key() -> str:
    """256 random bits, URL-safe, with a recognisable prefix (secret scanners match on it)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
