"""api_keys, and plans.tenant: API keys per tenant (only their hash is kept), plans owned by a
tenant (those from before belong to 'default')

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


def upgrade() -> None:
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
    with op.batch_alter_table("plans") as batch:
        batch.drop_index("ix_plans_tenant_status")
        batch.drop_column("tenant")
    op.drop_table("api_keys")
