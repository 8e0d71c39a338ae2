"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 14:55:13.487904
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "agent",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("conn_id", sa.String(length=64), nullable=True),
        sa.Column("gateway_id", sa.String(length=64), nullable=True),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent")),
    )
    op.create_table(
        "gateway_lease",
        sa.Column("gateway_id", sa.String(length=64), nullable=False),
        sa.Column("boot_id", sa.String(length=64), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_ttl_s", sa.Float(), nullable=False),
        sa.Column("agents", sa.Integer(), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("gateway_id", name=op.f("pk_gateway_lease")),
    )
    op.create_table(
        "technician",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.CheckConstraint("role IN ('admin', 'tech', 'viewer')", name=op.f("ck_technician_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_technician")),
    )
    with op.batch_alter_table("technician", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_technician_username"), ["username"], unique=True)

    op.create_table(
        "tunnel_audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("agent_id", sa.String(length=64), nullable=True),
        sa.Column("session_id", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tunnel_audit")),
    )
    with op.batch_alter_table("tunnel_audit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tunnel_audit_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_tunnel_audit_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_tunnel_audit_at"), ["at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_tunnel_audit_session_id"), ["session_id"], unique=False
        )

    op.create_table(
        "agent_connection",
        sa.Column("conn_id", sa.String(length=64), nullable=False),
        sa.Column("agent_id", sa.String(length=64), nullable=False),
        sa.Column("gateway_id", sa.String(length=64), nullable=False),
        sa.Column("boot_id", sa.String(length=64), nullable=False),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disconnected_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agent.id"],
            name=op.f("fk_agent_connection_agent_id_agent"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conn_id", name=op.f("pk_agent_connection")),
    )
    with op.batch_alter_table("agent_connection", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_agent_connection_agent_id"), ["agent_id"], unique=False
        )

    op.create_table(
        "tech_session",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("agent_id", sa.String(length=64), nullable=False),
        sa.Column("tech_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("close_reason", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("gateway_id", sa.String(length=64), nullable=True),
        sa.Column("conn_id", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'active', 'closed', 'failed')", name=op.f("ck_tech_session_state")
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agent.id"],
            name=op.f("fk_tech_session_agent_id_agent"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tech_id"],
            ["technician.id"],
            name=op.f("fk_tech_session_tech_id_technician"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tech_session")),
    )
    with op.batch_alter_table("tech_session", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tech_session_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_tech_session_conn_id"), ["conn_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_tech_session_tech_id"), ["tech_id"], unique=False)
        batch_op.create_index(
            "uq_tech_session_agent_open",
            ["agent_id"],
            unique=True,
            postgresql_where=sa.text("state IN ('pending', 'active')"),
            sqlite_where=sa.text("state IN ('pending', 'active')"),
        )


def downgrade() -> None:

    with op.batch_alter_table("tech_session", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_tech_session_agent_open",
            postgresql_where=sa.text("state IN ('pending', 'active')"),
            sqlite_where=sa.text("state IN ('pending', 'active')"),
        )
        batch_op.drop_index(batch_op.f("ix_tech_session_tech_id"))
        batch_op.drop_index(batch_op.f("ix_tech_session_conn_id"))
        batch_op.drop_index(batch_op.f("ix_tech_session_agent_id"))

    op.drop_table("tech_session")
    with op.batch_alter_table("agent_connection", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agent_connection_agent_id"))

    op.drop_table("agent_connection")
    with op.batch_alter_table("tunnel_audit", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tunnel_audit_session_id"))
        batch_op.drop_index(batch_op.f("ix_tunnel_audit_at"))
        batch_op.drop_index(batch_op.f("ix_tunnel_audit_agent_id"))
        batch_op.drop_index(batch_op.f("ix_tunnel_audit_action"))

    op.drop_table("tunnel_audit")
    with op.batch_alter_table("technician", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_technician_username"))

    op.drop_table("technician")
    op.drop_table("gateway_lease")
    op.drop_table("agent")
