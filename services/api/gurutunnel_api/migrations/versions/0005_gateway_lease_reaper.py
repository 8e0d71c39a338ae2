"""gateway leases judged on the API's clock: gateway_lease.renewed_at, lost_boot_id, lost_at

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-22 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("gateway_lease", schema=None) as batch_op:
        batch_op.add_column(sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lost_boot_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lost_at", sa.DateTime(timezone=True), nullable=True))
    # existing rows: the gateway's last ``at`` is the best there is; the reaper judges a lease
    # renewed before its own start from that start anyway (see agents/leases.py)
    lease = sa.table(
        "gateway_lease",
        sa.column("renewed_at", sa.DateTime(timezone=True)),
        sa.column("last_seen_at", sa.DateTime(timezone=True)),
    )
    op.execute(lease.update().values(renewed_at=lease.c.last_seen_at))
    # then NOT NULL: batch mode copies the table on SQLite, a plain ALTER on PostgreSQL
    with op.batch_alter_table("gateway_lease", schema=None) as batch_op:
        batch_op.alter_column(
            "renewed_at", existing_type=sa.DateTime(timezone=True), nullable=False
        )


def downgrade() -> None:
    with op.batch_alter_table("gateway_lease", schema=None) as batch_op:
        batch_op.drop_column("lost_at")
        batch_op.drop_column("lost_boot_id")
        batch_op.drop_column("renewed_at")
