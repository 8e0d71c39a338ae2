"""Table ``tunnel_audit``: one row per state change, written in the change's transaction.

Commands (``command.run``) are the exception that proves the rule: their row is written and
committed before the command is sent (no audit, no command) and completed when it ends
(``ended_at``, ``reason`` = exit reason or refusal code, ``exit_code``, ``duration_s``, bytes,
``truncated``); a row with ``ended_at`` NULL is a command still running (or lost by a crash).
File transfers (``file.upload`` / ``file.download``) follow the same rule: one row written
before the first frame goes to the agent (``file_path``, and what is known then of
``file_size``, ``file_sha256``, ``file_offset``), completed when the transfer ends with
``ended_at``, the size, SHA-256 and resume offset the agent reported, and ``reason`` = ``done``
or the error code (``client_gone`` when the HTTP client went away).
"""

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
    COMMAND_RUN = "command.run"
    SHELL_OPEN = "shell.open"
    SHELL_CLOSE = "shell.close"
    FILE_UPLOAD = "file.upload"
    FILE_DOWNLOAD = "file.download"


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
    # commands and shells
    channel_id: str | None = Field(default=None, max_length=64, index=True)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    exit_code: int | None = None
    duration_s: float | None = None
    stdout_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    stderr_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    truncated: bool | None = None
    # file transfers
    file_path: str | None = Field(default=None, max_length=4096)
    file_size: int | None = Field(default=None, sa_type=sa.BigInteger)
    file_sha256: str | None = Field(default=None, max_length=64)
    file_offset: int | None = Field(default=None, sa_type=sa.BigInteger)
    """The offset the transfer resumed from (upload: the agent's; download: the Range start)."""
