"""agent_connection.connected_seq: order connections by the stream sequence of `connected`

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # a nullable column: batch mode copies the table on SQLite, a plain ALTER on PostgreSQL
    with op.batch_alter_table("agent_connection", schema=None) as batch_op:
        batch_op.add_column(sa.Column("connected_seq", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agent_connection", schema=None) as batch_op:
        batch_op.drop_column("connected_seq")
