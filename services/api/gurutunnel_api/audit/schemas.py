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
    channel_id: str | None = None
    ended_at: datetime | None = None
    exit_code: int | None = None
    duration_s: float | None = None
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    truncated: bool | None = None
    file_path: str | None = None
    file_size: int | None = None
    file_sha256: str | None = None
    file_offset: int | None = None

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
            channel_id=row.channel_id,
            ended_at=row.ended_at,
            exit_code=row.exit_code,
            duration_s=row.duration_s,
            stdout_bytes=row.stdout_bytes,
            stderr_bytes=row.stderr_bytes,
            truncated=row.truncated,
            file_path=row.file_path,
            file_size=row.file_size,
            file_sha256=row.file_sha256,
            file_offset=row.file_offset,
        )


class AuditsPublic(BaseModel):
    data: list[AuditPublic]
    count: int
