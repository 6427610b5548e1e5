"""plans.device_name, predicted_max, real_max: the simulator's fidelity on real devices

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 19:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("plans") as batch:
        batch.add_column(sa.Column("device_name", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("predicted_max", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("real_max", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("plans") as batch:
        batch.drop_column("real_max")
        batch.drop_column("predicted_max")
        batch.drop_column("device_name")
