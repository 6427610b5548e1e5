"""api_keys, and plans.tenant: API keys per tenant (only their hash is kept), plans owned by a
tenant (those from before belong to 'default'); on PostgreSQL, triggers that NOTIFY the change
feed when a plan's status, attempt or cancel flag changes or a trial is stored (in the writing
statement itself: the store's writes used to pay a round trip for `SELECT pg_notify(...)`)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION trainplan_notify() RETURNS trigger AS $$
BEGIN
    IF TG_TABLE_NAME = 'trials' THEN
        PERFORM pg_notify('trainplan_plans', NEW.plan_id);
    ELSE
        PERFORM pg_notify('trainplan_plans', NEW.id);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
TRIGGERS = {
    "trainplan_plans_changed": "AFTER UPDATE OF status, attempts, cancel_requested ON plans",
    "trainplan_trial_stored": "AFTER INSERT ON trials",
}


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NOTIFY_FUNCTION)
        for name, when in TRIGGERS.items():
            op.execute(
                f"CREATE TRIGGER {name} {when} FOR EACH ROW EXECUTE FUNCTION trainplan_notify()"
            )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), primary_key=True),
        sa.Column("tenant", sa.String(length=100), nullable=False, index=True),
        sa.Column("scopes", sa.String(length=100), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    with op.batch_alter_table("plans") as batch:
        batch.add_column(
            sa.Column("tenant", sa.String(length=100), nullable=False, server_default="default")
        )
        batch.create_index("ix_plans_tenant_status", ["tenant", "status"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS trainplan_plans_changed ON plans")
        op.execute("DROP TRIGGER IF EXISTS trainplan_trial_stored ON trials")
        op.execute("DROP FUNCTION IF EXISTS trainplan_notify()")
    with op.batch_alter_table("plans") as batch:
        batch.drop_index("ix_plans_tenant_status")
        batch.drop_column("tenant")
    op.drop_table("api_keys")
