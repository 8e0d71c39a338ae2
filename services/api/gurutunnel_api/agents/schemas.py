"""HTTP schemas of agents."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from ..schemas import RequestModel
from .models import Agent


class AgentCreate(RequestModel):
    name: str = Field(min_length=1, max_length=128)


class AgentPublic(BaseModel):
    id: str
    name: str
    online: bool
    last_seen_at: datetime | None
    gateway_id: str | None
    revoked: bool
    metrics: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: Agent) -> AgentPublic:
        return cls(
            id=row.id,
            name=row.name,
            online=row.online,
            last_seen_at=row.last_seen_at,
            gateway_id=row.gateway_id,
            revoked=row.revoked_at is not None,
            metrics=row.metrics,
        )


class AgentsPublic(BaseModel):
    data: list[AgentPublic]
    count: int


class AgentEnrolled(BaseModel):
    """The answer to an enrolment; ``credential`` is shown this once and never stored."""

    agent: AgentPublic
    credential: str
