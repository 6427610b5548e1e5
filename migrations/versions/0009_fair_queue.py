"""plans.fair_key: a virtual start time per plan, so claims interleave tenants round-robin

Claims ordered by the tenant's running count fell back to first come, first served whenever
workers claimed together (they all saw the same counts): three workers served a backlog of 9
ahead of another tenant's 3. Existing plans keep their order (fair_key = seq).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 06:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("plans") as batch:
        batch.add_column(sa.Column("fair_key", sa.BigInteger(), nullable=True))
    op.execute("UPDATE plans SET fair_key = seq")
    with op.batch_alter_table("plans") as batch:
        batch.alter_column("fair_key", existing_type=sa.BigInteger(), nullable=False)
        batch.drop_index("ix_plans_tenant_status")
        batch.create_index("ix_plans_tenant_status_fair", ["tenant", "status", "fair_key"])
        batch.create_index("ix_plans_status_fair", ["status", "fair_key", "seq"])


def downgrade() -> None:
    with op.batch_alter_table("plans") as batch:
        batch.drop_index("ix_plans_status_fair")
        batch.drop_index("ix_plans_tenant_status_fair")
        batch.create_index("ix_plans_tenant_status", ["tenant", "status"])
        batch.drop_column("fair_key")
