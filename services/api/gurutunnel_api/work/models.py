"""Table ``ws_ticket``: single-use WebSocket tickets, stored only as their SHA-256.

A ticket is bound to one technician and one session and valid ``ws_ticket_ttl_s``; redeeming
sets ``used_at`` with a conditional UPDATE, so two redemptions (on any API replica) cannot
both succeed.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from ..db import UTCDateTime, utcnow


class WsTicket(SQLModel, table=True):
    __tablename__ = "ws_ticket"

    token_hash: str = Field(primary_key=True, max_length=64)
    tech_id: str = Field(foreign_key="technician.id", ondelete="CASCADE", index=True, max_length=64)
    session_id: str = Field(foreign_key="tech_session.id", ondelete="CASCADE", max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    expires_at: datetime = Field(sa_type=UTCDateTime, nullable=False, index=True)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
