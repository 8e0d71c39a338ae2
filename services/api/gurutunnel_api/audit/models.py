"""Table ``tunnel_audit``: one row per state change, written in the change's transaction."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from ..db import UTCDateTime, utcnow

SYSTEM_ACTOR = "system"


class AuditAction(StrEnum):
    SESSION_OPEN = "session.open"
    SESSION_ACTIVE = "session.active"
    SESSION_CLOSE = "session.close"
    SESSION_FAILED = "session.failed"
    AGENT_ENROLL = "agent.enroll"
    AGENT_REVOKE = "agent.revoke"


class TunnelAudit(SQLModel, table=True):
    __tablename__ = "tunnel_audit"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False, index=True)
    actor: str = Field(max_length=64)
    """Technician id, or ``"system"`` for bus-driven changes."""
    action: str = Field(max_length=64, index=True)
    agent_id: str | None = Field(default=None, max_length=64, index=True)
    session_id: str | None = Field(default=None, max_length=64, index=True)
    reason: str | None = Field(default=None, max_length=64)
    detail: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
