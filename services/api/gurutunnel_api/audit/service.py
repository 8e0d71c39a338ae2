"""Audit rows: ``record`` adds one to the caller's transaction; ``list_audit`` pages them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from ..db import utcnow
from .models import AuditAction, TunnelAudit


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
    row = TunnelAudit(
        at=utcnow(),
        actor=actor,
        action=action.value,
        agent_id=agent_id,
        session_id=session_id,
        reason=reason,
        detail=detail,
    )
    db.add(row)
    return row


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
