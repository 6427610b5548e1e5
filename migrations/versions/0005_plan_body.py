"""plans.max_micro_batch_size, plans.body and plans.body_schema: the list reads the answer from
a column, and a finished plan's response is stored serialised; on PostgreSQL, a sequence for
plans.seq (max + 1 collided under concurrent submits: 503s at ~280 submits/s)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

plans = sa.table(
    "plans",
    sa.column("id", sa.String),
    sa.column("result", sa.JSON),
    sa.column("max_micro_batch_size", sa.Integer),
)


SEQUENCE = "plans_seq_seq"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE SEQUENCE IF NOT EXISTS {SEQUENCE}")
        op.execute(
            f"SELECT setval('{SEQUENCE}', COALESCE((SELECT max(seq) FROM plans), 0) + 1, false)"
        )
    with op.batch_alter_table("plans") as batch:
        batch.add_column(sa.Column("max_micro_batch_size", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("body", sa.Text(), nullable=True))
        batch.add_column(sa.Column("body_schema", sa.String(length=16), nullable=True))
    # Bodies are rendered on first read; the answer is copied out of the stored results.
    conn = op.get_bind()
    rows = conn.execute(sa.select(plans.c.id, plans.c.result).where(plans.c.result.is_not(None)))
    for plan_id, result in rows.all():
        answer = (result or {}).get("max_micro_batch_size")
        if answer is not None:
            conn.execute(
                plans.update().where(plans.c.id == plan_id).values(max_micro_batch_size=answer)
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP SEQUENCE IF EXISTS {SEQUENCE}")
    with op.batch_alter_table("plans") as batch:
        batch.drop_column("body_schema")
        batch.drop_column("body")
        batch.drop_column("max_micro_batch_size")
