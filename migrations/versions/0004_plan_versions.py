"""plans.versions and plans.reuse_key: a stored plan is reused only by the engine that made it

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 01:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows from before have no key: an unknown engine made them, so none is reused.
    with op.batch_alter_table("plans") as batch:
        batch.add_column(sa.Column("versions", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("reuse_key", sa.String(length=64), nullable=True))
        batch.create_index("ix_plans_reuse_key", ["reuse_key"])


def downgrade() -> None:
    with op.batch_alter_table("plans") as batch:
        batch.drop_index("ix_plans_reuse_key")
        batch.drop_column("reuse_key")
        batch.drop_column("versions")
