"""HTTP schemas of tunnel sessions."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from gurutunnel_protocol import Id

from ..schemas import RequestModel
from .models import SessionState, TechSession


class SessionCreate(RequestModel):
    agent_id: Id


class SessionClose(RequestModel):
    session_id: Id


class SessionPublic(BaseModel):
    id: str
    agent_id: str
    tech_id: str
    state: SessionState
    close_reason: str | None
    created_at: datetime
    opened_at: datetime | None
    closed_at: datetime | None
    gateway_id: str | None
    conn_id: str | None

    @classmethod
    def from_row(cls, row: TechSession) -> SessionPublic:
        return cls(
            id=row.id,
            agent_id=row.agent_id,
            tech_id=row.tech_id,
            state=SessionState(row.state),
            close_reason=row.close_reason,
            created_at=row.created_at,
            opened_at=row.opened_at,
            closed_at=row.closed_at,
            gateway_id=row.gateway_id,
            conn_id=row.conn_id,
        )


class SessionsPublic(BaseModel):
    data: list[SessionPublic]
    count: int
