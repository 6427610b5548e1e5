"""API keys per tenant (only their hash is stored) and each key's shared submit bucket.

Every function here that writes commits its own transaction: one call is one unit of work,
so the API and the worker loop never commit (or half-commit) on the store's behalf."""

from __future__ import annotations

import uuid

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session

from service.core.principal import key_hash, new_key
from service.store.common import now
from service.store.models import ApiKey


def create_key(
    session: Session, *, tenant: str, scopes: list[str], hashed: str, prefix: str
) -> ApiKey:
    key = ApiKey(
        id=str(uuid.uuid4()),
        tenant=tenant,
        scopes=",".join(scopes),
        hash=hashed,
        prefix=prefix,
        created_at=now(),
    )
    session.add(key)
    session.commit()
    return key


def issue_key(session: Session, *, tenant: str, scopes: list[str]) -> tuple[str, ApiKey]:
    """A new key for `tenant`: the secret (shown once, never stored) and its stored row, which
    keeps the hash and the first 10 characters to name it by."""
    key = new_key()
    return key, create_key(
        session, tenant=tenant, scopes=scopes, hashed=key_hash(key), prefix=key[:10]
    )


def find_key(session: Session, *, hashed: str) -> ApiKey | None:
    """The live (not revoked) key with this hash."""
    return session.scalars(
        select(ApiKey).where(ApiKey.hash == hashed, ApiKey.revoked_at.is_(None))
    ).first()


def touch_key(session: Session, *, key_id: str) -> None:
    session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now()))
    session.commit()


def take_submit(
    session: Session, *, key_id: str, capacity: float, per_second: float, at: float
) -> tuple[bool, float]:
    """Take one token from the key's bucket at `at` (epoch seconds): (taken, tokens left).
    One conditional UPDATE, so API processes sharing the store share the bucket: PostgreSQL
    re-checks the WHERE on the row it locked, and SQLite writes one at a time."""
    stored = func.coalesce(ApiKey.rate_tokens, capacity)
    refilled = stored + (at - func.coalesce(ApiKey.rate_at, at)) * per_second
    tokens = case((refilled > capacity, capacity), else_=refilled)
    left = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, tokens >= 1)
        .values(rate_tokens=tokens - 1, rate_at=at)
        .returning(ApiKey.rate_tokens)
    ).scalar_one_or_none()
    if left is not None:
        session.commit()
        return True, float(left)
    row = session.execute(select(tokens).where(ApiKey.id == key_id)).scalar_one_or_none()
    session.rollback()
    return False, float(row if row is not None else 0.0)


def list_keys(session: Session, *, tenant: str | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.created_at)
    if tenant:
        stmt = stmt.where(ApiKey.tenant == tenant)
    return list(session.scalars(stmt))


def revoke_key(session: Session, *, key_id_or_prefix: str) -> list[ApiKey]:
    """Revoke the live key with this id or prefix. A prefix is not unique: when it names several
    keys none is revoked and all are returned, so the caller can ask for the id."""
    keys = list(
        session.scalars(
            select(ApiKey).where(
                or_(ApiKey.id == key_id_or_prefix, ApiKey.prefix == key_id_or_prefix),
                ApiKey.revoked_at.is_(None),
            )
        )
    )
    if len(keys) == 1:
        keys[0].revoked_at = now()
        session.commit()
    return keys
