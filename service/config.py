"""All settings in one pydantic-settings object, read from `TRAINPLAN_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINPLAN_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default="sqlite:///./trainplan.db",
        description="SQLAlchemy URL; postgresql+psycopg://... in production.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    embedded_worker: bool = Field(default=True, description="`serve` runs one worker in-process.")
    api_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="API processes `serve` starts (uvicorn workers); the store is migrated and "
        "the embedded worker started once, in the parent, not once per process.",
    )
    migrate_on_start: bool = Field(
        default=True, description="The API upgrades the store when it starts."
    )
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A claim lasts this long unless the worker's heartbeat extends it.",
    )
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    heartbeat_file: Path | None = Field(
        default=None,
        description="A worker touches this file after each heartbeat the store accepted; "
        "`trainplan worker-health` (the container's health check) reads its age.",
    )
    poll_seconds: float = Field(default=0.5, gt=0, description="Idle worker's queue poll period.")
    plan_timeout_seconds: float = Field(default=900.0, gt=0, description="Time limit of one plan.")
    plan_memory_limit_gib: float = Field(
        default=16.0,
        ge=0,
        description="Memory a plan's process may use (its data segment) on the simulated and "
        "cpu devices; past it the plan fails with 'plan-memory-limit'. 0: no limit.",
    )
    max_attempts: int = Field(default=3, ge=1, description="Claims of one plan before it fails.")
    auth_mode: Literal["none", "token", "keys"] = Field(
        default="none",
        description="none: loopback, one tenant; token: the shared API_TOKENS (one tenant); "
        "keys: API keys per tenant (`trainplan keys create`).",
    )
    submit_rate_per_minute: int = Field(
        default=1200, ge=1, description="Submits one API key may make a minute (keys mode)."
    )
    tenant_max_active: int = Field(
        default=10_000, ge=1, description="Plans a tenant may have queued or running at once."
    )
    key_cache_seconds: float = Field(
        default=5.0, ge=0, description="How long an API process trusts a key it looked up."
    )
    api_tokens: list[str] = Field(
        default_factory=list, description="Bearer tokens (auth_mode=token)."
    )
    webhook_secret: str | None = Field(
        default=None,
        min_length=16,
        description="Signs completion webhooks (each tenant's secret is derived from it); "
        "unset: a submit with callback_url is refused.",
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Call back private, loopback and link-local addresses too (SSRF: off).",
    )
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    webhook_max_age_seconds: float = Field(
        default=86_400.0, gt=0, description="Retry a delivery until its plan ended this long ago."
    )
    webhook_backoff_seconds: float = Field(
        default=5.0, gt=0, description="First retry's delay; doubled per attempt, up to 10 min."
    )
    webhook_poll_seconds: float = Field(default=1.0, gt=0)
    admission_wait_seconds: float = Field(
        default=8.0,
        ge=0,
        le=25,
        description="How long an admission hook waits for a plan (Kubernetes gives webhooks "
        "10 s by default, 30 s at most).",
    )
    admission_on_timeout: Literal["allow", "deny"] = Field(
        default="allow",
        description="A plan not finished in time: admit the workload unchanged (with a "
        "warning) or deny it; the plan goes on and answers the next request.",
    )
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    # What one spec may cost (service/api/limits.py): over a limit is a 422 at submit.
    max_layers: int = Field(
        default=512, ge=1, description="Transformer blocks a config may ask for."
    )
    max_parameters: float = Field(default=2e12, gt=0, description="Parameters of one model.")
    max_activation_elements: float = Field(
        default=float(2**44),
        gt=0,
        description="Price of one sample's activations: its elements at the first layer "
        "times the layers that hold weights.",
    )
    max_sequence_length: int = Field(default=131072, ge=1)
    max_world_size: int = Field(default=4096, ge=1, description="GPUs one plan may lay out.")
    max_wait_seconds: float = Field(default=60.0, ge=0)
    page_size_max: int = Field(default=200, ge=1)
    model_check_cache: int = Field(
        default=256,
        ge=0,
        description="Model builds kept by submit's check (0: build every time).",
    )
    feed_poll_seconds: float = Field(
        default=0.25,
        gt=0,
        description="On SQLite, how often the change feed looks for changes to followed plans "
        "(one query per tick for all of them); PostgreSQL pushes them (LISTEN/NOTIFY).",
    )
    keepalive_seconds: float = Field(
        default=15.0, gt=0, description="An idle event stream sends a comment this often."
    )
    log_json: bool = False


@lru_cache
def get_settings() -> Settings:
    return Settings()
