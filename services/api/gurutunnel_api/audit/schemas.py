"""HTTP schemas of the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from .models import TunnelAudit


class AuditPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    agent_id: str | None
    session_id: str | None
    reason: str | None
    detail: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: TunnelAudit) -> AuditPublic:
        assert row.id is not None
        return cls(
            id=row.id,
            at=row.at,
            actor=row.actor,
            action=row.action,
            agent_id=row.agent_id,
            session_id=row.session_id,
            reason=row.reason,
            detail=row.detail,
        )


class AuditsPublic(BaseModel):
    data: list[AuditPublic]
    count: int
