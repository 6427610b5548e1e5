"""Tables: plans (the queue and the results), their trials, and the workers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Plan(Base):
    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Submission order, for cursors and ties between claims.
    seq: Mapped[int] = mapped_column(Integer, index=True, unique=True)
    # Virtual start time (start-time fair queueing): claims take the lowest, so backlogged
    # tenants are served in turn (`plans.fair_key`).
    fair_key: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64), index=True)
    # The engine, torch and catalogue versions the plan is made with, and the key a new submit
    # is reused by: the spec's hash with those versions (an upgrade makes new plans).
    versions: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reuse_key: Mapped[str | None] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    # Who owns it: every read, list, stream and cancel is confined to the caller's tenant.
    tenant: Mapped[str] = mapped_column(String(100), default="default", server_default="default")
    device_kind: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(100))
    lease_until: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Copied out of a real device's result, so the simulator's fidelity aggregates in SQL.
    device_name: Mapped[str | None] = mapped_column(String(200))
    predicted_max: Mapped[int | None] = mapped_column(Integer)
    real_max: Mapped[int | None] = mapped_column(Integer)
    log_peak_ratio: Mapped[float | None] = mapped_column(Float)  # ln(real / simulated peak)
    # Copied out of the result, so the list reads it without the result's JSON.
    max_micro_batch_size: Mapped[int | None] = mapped_column(Integer)
    # A finished plan's response, serialised once; `body_schema` names the API shape it was
    # rendered in (a hash of its JSON schema). A GET serves the bytes without re-validating.
    body: Mapped[str | None] = mapped_column(Text)
    body_schema: Mapped[str | None] = mapped_column(String(16))

    # Every attempt's trials; the API shows only the current attempt's (`plans.trials_of`).
    trial_rows: Mapped[list[TrialRow]] = relationship(
        back_populates="plan", order_by="TrialRow.index", cascade="all, delete-orphan"
    )

    __table_args__ = (
        Index("ix_plans_status_seq", "status", "seq"),
        Index("ix_plans_tenant_status_fair", "tenant", "status", "fair_key"),
        Index("ix_plans_status_fair", "status", "fair_key", "seq"),
    )


class TrialRow(Base):
    __tablename__ = "trials"

    plan_id: Mapped[str] = mapped_column(
        ForeignKey("plans.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_size: Mapped[int] = mapped_column(Integer)
    fits: Mapped[bool] = mapped_column(Boolean)
    peak_bytes: Mapped[int] = mapped_column(BigInteger)
    duration_s: Mapped[float] = mapped_column(Float)
    phase: Mapped[str] = mapped_column(String(16), default="search")
    scenario: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]

    plan: Mapped[Plan] = relationship(back_populates="trial_rows")


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    devices: Mapped[dict[str, Any]] = mapped_column(JSON)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    current_plan_id: Mapped[str | None] = mapped_column(String(36))
    plans_done: Mapped[int] = mapped_column(Integer, default=0)
    stopped: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiKey(Base):
    """A tenant's key: only its SHA-256 is kept (keys are 256 random bits, so a fast hash is
    enough); `prefix` names it in listings."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    scopes: Mapped[str] = mapped_column(String(100))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # The key's submit bucket (tokens left at `rate_at`, epoch seconds); NULL is a full bucket.
    rate_tokens: Mapped[float | None]
    rate_at: Mapped[float | None]


class AuditEvent(Base):
    """One thing a key did: submit, cancel, read, list or stream (a plan, where there is one)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    key_id: Mapped[str | None] = mapped_column(String(36))
    action: Mapped[str] = mapped_column(String(16))
    plan_id: Mapped[str | None] = mapped_column(String(36), index=True)


class Delivery(Base):
    """A completion webhook of one plan: subscribed at submit (`callback_url`), sent by a
    worker once the plan has ended, retried with backoff until delivered or too old. The state
    lives here, so neither an API nor a worker restart loses one (at least once)."""

    __tablename__ = "deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"), index=True)
    tenant: Mapped[str] = mapped_column(String(100))
    url: Mapped[str] = mapped_column(Text)
    # waiting (the plan runs) | retrying | delivered | failed (gave up)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]  # a sender holds it until then
    last_status: Mapped[int | None] = mapped_column(Integer)  # the receiver's HTTP status
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_deliveries_state_next", "state", "next_attempt_at"),)
