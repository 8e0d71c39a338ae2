"""Table ``tech_session``: one tunnel session of a technician on an agent.

At most one ``pending|active`` session per agent, enforced by the partial unique index
``uq_tech_session_agent_open`` on PostgreSQL and SQLite alike. ``last_activity_at`` drives the
idle timeout (see :mod:`gurutunnel_api.work.limits`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from ..db import UTCDateTime, utcnow


class SessionState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    CLOSED = "closed"
    FAILED = "failed"


OPEN_STATES = (SessionState.PENDING, SessionState.ACTIVE)
_OPEN_SQL = sa.text("state IN ('pending', 'active')")


class TechSession(SQLModel, table=True):
    __tablename__ = "tech_session"
    __table_args__ = (
        sa.Index(
            "uq_tech_session_agent_open",
            "agent_id",
            unique=True,
            postgresql_where=_OPEN_SQL,
            sqlite_where=_OPEN_SQL,
        ),
        sa.CheckConstraint("state IN ('pending', 'active', 'closed', 'failed')", name="state"),
    )

    id: str = Field(primary_key=True, max_length=64)
    agent_id: str = Field(foreign_key="agent.id", ondelete="CASCADE", index=True, max_length=64)
    tech_id: str = Field(foreign_key="technician.id", ondelete="CASCADE", index=True, max_length=64)
    state: str = Field(max_length=16)
    close_reason: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    opened_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    closed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    gateway_id: str | None = Field(default=None, max_length=64)
    conn_id: str | None = Field(default=None, max_length=64, index=True)
    last_activity_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    """Last exec, shell open, input, resize or cancel (NULL: none since ``opened_at``)."""
