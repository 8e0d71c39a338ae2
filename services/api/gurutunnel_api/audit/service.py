"""Audit rows: ``record`` adds one to the caller's ORM transaction, ``insert_row`` writes one
with a Core ``INSERT ... RETURNING`` on the caller's connection (no ORM object: the hot path of
commands); ``list_audit`` pages them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlmodel import col

from ..db import utcnow
from .models import AuditAction, TunnelAudit

# Built once: a statement's cache key is memoized on it, so SQLAlchemy neither rebuilds nor
# re-traverses it per call (the columns come from the parameters' keys).
_INSERT_RETURNING_ID = insert(TunnelAudit).returning(col(TunnelAudit.id))


def _values(
    actor: str,
    action: AuditAction,
    agent_id: str | None,
    session_id: str | None,
    reason: str | None,
    detail: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "at": utcnow(),
        "actor": actor,
        "action": action.value,
        "agent_id": agent_id,
        "session_id": session_id,
        "reason": reason,
        "detail": detail,
    }


def record(
    db: AsyncSession,
    *,
    actor: str,
    action: AuditAction,
    agent_id: str | None = None,
    session_id: str | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> TunnelAudit:
    """Add an audit row to the current transaction (committed with the change it records)."""
    row = TunnelAudit(**_values(actor, action, agent_id, session_id, reason, detail))
    db.add(row)
    return row


async def insert_row(
    conn: AsyncConnection,
    *,
    actor: str,
    action: AuditAction,
    agent_id: str | None = None,
    session_id: str | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
    columns: dict[str, Any] | None = None,
) -> int:
    """Insert an audit row in the caller's transaction (committed with it); its id.
    ``columns`` sets more columns (``channel_id``, the file columns)."""
    values = _values(actor, action, agent_id, session_id, reason, detail) | (columns or {})
    audit_id = await conn.scalar(_INSERT_RETURNING_ID, values)
    assert audit_id is not None
    return int(audit_id)


async def list_audit(
    db: AsyncSession,
    *,
    agent_id: str | None = None,
    session_id: str | None = None,
    action: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[TunnelAudit], int]:
    query = select(TunnelAudit)
    if agent_id is not None:
        query = query.where(col(TunnelAudit.agent_id) == agent_id)
    if session_id is not None:
        query = query.where(col(TunnelAudit.session_id) == session_id)
    if action is not None:
        query = query.where(col(TunnelAudit.action) == action)
    async with db.begin():
        count = await db.scalar(select(func.count()).select_from(query.subquery()))
        rows = await db.scalars(query.order_by(col(TunnelAudit.id)).limit(limit).offset(offset))
        return list(rows), int(count or 0)
