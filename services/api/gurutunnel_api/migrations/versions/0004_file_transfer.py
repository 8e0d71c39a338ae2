"""file transfer: technician.can_upload / can_download, file columns of tunnel_audit

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-15 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NOT NULL columns with a server default: existing rows get the tech defaults at once
    with op.batch_alter_table("technician", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("can_upload", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("can_download", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
    # then normalised by role, as the service stores them: admins both, viewers neither
    technician = sa.table(
        "technician",
        sa.column("role", sa.String()),
        sa.column("can_upload", sa.Boolean()),
        sa.column("can_download", sa.Boolean()),
    )
    op.execute(
        technician.update()
        .where(technician.c.role == "admin")
        .values(can_upload=True, can_download=True)
    )
    op.execute(
        technician.update()
        .where(technician.c.role == "viewer")
        .values(can_upload=False, can_download=False)
    )
    with op.batch_alter_table("tunnel_audit", schema=None) as batch_op:
        batch_op.add_column(sa.Column("file_path", sa.String(length=4096), nullable=True))
        batch_op.add_column(sa.Column("file_size", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("file_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("file_offset", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tunnel_audit", schema=None) as batch_op:
        for name in ("file_offset", "file_sha256", "file_size", "file_path"):
            batch_op.drop_column(name)
    with op.batch_alter_table("technician", schema=None) as batch_op:
        batch_op.drop_column("can_download")
        batch_op.drop_column("can_upload")
