"""work inside a session: command audit columns, last_activity_at, ws_ticket

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # nullable columns only: batch mode copies the table on SQLite, plain ALTERs on PostgreSQL
    with op.batch_alter_table("tunnel_audit", schema=None) as batch_op:
        batch_op.add_column(sa.Column("channel_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("exit_code", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("duration_s", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("stdout_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("stderr_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("truncated", sa.Boolean(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_tunnel_audit_channel_id"), ["channel_id"], unique=False
        )
    with op.batch_alter_table("tech_session", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_activity_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.create_table(
        "ws_ticket",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("tech_id", sa.String(length=64), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["tech_id"],
            ["technician.id"],
            name=op.f("fk_ws_ticket_tech_id_technician"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["tech_session.id"],
            name=op.f("fk_ws_ticket_session_id_tech_session"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_ws_ticket")),
    )
    with op.batch_alter_table("ws_ticket", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ws_ticket_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_ws_ticket_tech_id"), ["tech_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ws_ticket", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ws_ticket_tech_id"))
        batch_op.drop_index(batch_op.f("ix_ws_ticket_expires_at"))
    op.drop_table("ws_ticket")
    with op.batch_alter_table("tech_session", schema=None) as batch_op:
        batch_op.drop_column("last_activity_at")
    with op.batch_alter_table("tunnel_audit", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tunnel_audit_channel_id"))
        for name in (
            "truncated",
            "stderr_bytes",
            "stdout_bytes",
            "duration_s",
            "exit_code",
            "ended_at",
            "channel_id",
        ):
            batch_op.drop_column(name)
