"""The session state machine: open, activate, close, and the helpers presence handlers share.

Contract (docs/design.md "Sessions (api)"):
- ``open_session`` inserts ``pending`` (+ audit ``session.open``); the partial unique index makes a
  concurrent second open an IntegrityError -> 409 ``session_exists``. It then requests
  ``tunnel.open`` with ``open_timeout_s``; on ``tunnel.ready`` ``activate`` marks it ``active``
  bound to the reply's ``conn_id``/``gateway_id`` (+ ``session.active``). No responders:
  ``failed/agent_offline`` and 409; no answer: ``failed/open_timeout``, 504 and a best-effort
  ``tunnel.close``; ``tunnel.error{tunnel_busy}``: ``failed/agent_busy`` and 409 ``agent_busy``.
- ``activate`` locks the agent row (as the presence handlers do), so activation and presence are
  serialised per agent: activation on a connection already recorded as disconnected closes the
  session at once (``agent_disconnected``) and the open answers 409 ``agent_offline``.
- ``close_session`` (owner or admin) closes in the database first and tells the agent
  best-effort afterwards; closing a closed session returns it unchanged.
- Every state change writes exactly one audit row in its own transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from gurutunnel_protocol import ErrorCode, new_id
from gurutunnel_protocol.messages import (
    CommandReply,
    TunnelClose,
    TunnelError,
    TunnelOpen,
    TunnelReady,
)

from ..agents.models import Agent, AgentConnection
from ..audit.models import AuditAction
from ..audit.service import record
from ..auth.models import Role, Technician
from ..bus import AgentOffline, AgentRefused, AgentTimeout, Bus, BusError, BusUnavailable
from ..config import ApiSettings
from ..db import utcnow
from ..errors import AgentFailed, ApiError, Conflict, Forbidden, NotFound, bus_error_to_api
from .models import OPEN_STATES, SessionState, TechSession

log = logging.getLogger(__name__)


async def lock_agent(db: AsyncSession, agent_id: str) -> Agent | None:
    """Load the agent row locked for this transaction (``FOR UPDATE``; SQLite's ``BEGIN
    IMMEDIATE`` already serialises writers)."""
    return await db.get(Agent, agent_id, with_for_update=True, populate_existing=True)


def finish(
    db: AsyncSession,
    row: TechSession,
    *,
    state: SessionState,
    reason: str,
    actor: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Move an open session to ``closed``/``failed`` and add its one audit row."""
    row.state = state.value
    row.close_reason = reason
    row.closed_at = utcnow()
    action = (
        AuditAction.SESSION_FAILED if state == SessionState.FAILED else AuditAction.SESSION_CLOSE
    )
    record(
        db,
        actor=actor,
        action=action,
        agent_id=row.agent_id,
        session_id=row.id,
        reason=reason,
        detail=detail,
    )


async def close_open_sessions(
    db: AsyncSession,
    *,
    agent_id: str,
    reason: str,
    actor: str,
    conn_id: str | None = None,
    other_than_conn_id: str | None = None,
    activated_before: datetime | None = None,
    detail: dict[str, Any] | None = None,
) -> list[TechSession]:
    """Close the agent's open sessions matching the filters (caller holds the agent lock)."""
    query = select(TechSession).where(
        col(TechSession.agent_id) == agent_id,
        col(TechSession.state).in_([s.value for s in OPEN_STATES]),
    )
    if conn_id is not None:
        query = query.where(col(TechSession.conn_id) == conn_id)
    if other_than_conn_id is not None:
        query = query.where(
            col(TechSession.state) == SessionState.ACTIVE.value,
            col(TechSession.conn_id) != other_than_conn_id,
        )
    if activated_before is not None:
        query = query.where(col(TechSession.opened_at) < activated_before)
    rows = list(await db.scalars(query.execution_options(populate_existing=True)))
    for row in rows:
        finish(db, row, state=SessionState.CLOSED, reason=reason, actor=actor, detail=detail)
    return rows


async def _insert_pending(db: AsyncSession, *, agent_id: str, tech: Technician) -> TechSession:
    async with db.begin():
        agent = await db.get(Agent, agent_id)
        if agent is None:
            raise NotFound("agent not found")
        if agent.revoked_at is not None:
            raise Conflict("agent is revoked")
        row = TechSession(
            id=new_id(), agent_id=agent_id, tech_id=tech.id, state=SessionState.PENDING.value
        )
        db.add(row)
        record(
            db, actor=tech.id, action=AuditAction.SESSION_OPEN, agent_id=agent_id, session_id=row.id
        )
        await db.flush()
    return row


async def _reap_abandoned_pending(db: AsyncSession, *, agent_id: str, older_than: datetime) -> bool:
    """Fail a ``pending`` session left behind by a crashed or cancelled open (older than any
    open could take); True when one was reaped."""
    async with db.begin():
        await lock_agent(db, agent_id)
        row = await db.scalar(
            select(TechSession).where(
                col(TechSession.agent_id) == agent_id,
                col(TechSession.state) == SessionState.PENDING.value,
                col(TechSession.created_at) < older_than,
            )
        )
        if row is None:
            return False
        finish(db, row, state=SessionState.FAILED, reason="open_timeout", actor="system")
    return True


async def _fail_pending(
    db: AsyncSession, *, session_id: str, reason: str, actor: str, detail: dict[str, Any] | None
) -> None:
    async with db.begin():
        row = await db.get(TechSession, session_id, with_for_update=True, populate_existing=True)
        if row is not None and row.state == SessionState.PENDING.value:
            finish(db, row, state=SessionState.FAILED, reason=reason, actor=actor, detail=detail)


def _failure_reason(exc: BusError) -> str:
    if isinstance(exc, AgentOffline):
        return "agent_offline"
    if isinstance(exc, AgentTimeout):
        return "open_timeout"
    if isinstance(exc, BusUnavailable):
        return "bus_unavailable"
    if isinstance(exc, AgentRefused):
        return {
            ErrorCode.TUNNEL_BUSY: "agent_busy",
            ErrorCode.AGENT_OFFLINE: "agent_offline",
            ErrorCode.AGENT_TIMEOUT: "open_timeout",
        }.get(exc.code, "agent_error")
    return "agent_error"


async def open_session(
    db: AsyncSession, *, bus: Bus, settings: ApiSettings, agent_id: str, tech: Technician
) -> TechSession:
    """Open a tunnel session on ``agent_id`` for ``tech`` (see the module contract)."""
    try:
        row = await _insert_pending(db, agent_id=agent_id, tech=tech)
    except IntegrityError:
        stale = utcnow() - timedelta(seconds=settings.open_timeout_s + settings.close_timeout_s)
        if not await _reap_abandoned_pending(db, agent_id=agent_id, older_than=stale):
            raise Conflict(
                "agent already has an open session", code=ErrorCode.SESSION_EXISTS
            ) from None
        try:
            row = await _insert_pending(db, agent_id=agent_id, tech=tech)
        except IntegrityError:
            raise Conflict(
                "agent already has an open session", code=ErrorCode.SESSION_EXISTS
            ) from None

    close = TunnelClose(req_id=new_id(), session_id=row.id, reason="open_failed")
    try:
        reply = await bus.request_agent(
            agent_id,
            TunnelOpen(req_id=new_id(), session_id=row.id, tech_id=tech.id),
            settings.open_timeout_s,
        )
    except BusError as exc:
        reason = _failure_reason(exc)
        await _fail_pending(db, session_id=row.id, reason=reason, actor=tech.id, detail=None)
        if reason == "open_timeout":
            # a late agent may still enter tunnel mode: tell it to leave
            bus.send_best_effort(agent_id, close, settings.close_timeout_s)
        raise bus_error_to_api(exc) from None

    answer = reply.frame
    problem: ApiError | None = None
    if isinstance(answer, TunnelError):
        if answer.code == ErrorCode.TUNNEL_BUSY:
            problem = Conflict("agent is busy with another session", code=ErrorCode.AGENT_BUSY)
        else:
            problem = AgentFailed(f"agent refused the session ({answer.code.value})")
    elif not isinstance(answer, TunnelReady) or answer.session_id != row.id:
        problem = AgentFailed(f"unexpected answer from the agent ({answer.type})")
    if problem is not None:
        reason = "agent_busy" if problem.code == ErrorCode.AGENT_BUSY else "agent_error"
        detail = {"code": answer.code.value} if isinstance(answer, TunnelError) else None
        await _fail_pending(db, session_id=row.id, reason=reason, actor=tech.id, detail=detail)
        if not isinstance(answer, TunnelError):
            bus.send_best_effort(agent_id, close, settings.close_timeout_s)
        raise problem

    try:
        return await activate(db, session_id=row.id, reply=reply, actor=tech.id)
    except Exception:
        # not activated (closed meanwhile, connection gone, database failure) although the agent
        # entered tunnel mode: tell it to leave
        bus.send_best_effort(agent_id, close, settings.close_timeout_s)
        raise


async def activate(
    db: AsyncSession, *, session_id: str, reply: CommandReply, actor: str
) -> TechSession:
    """Mark a pending session active on the replying connection, unless that connection is
    already known to be gone (then close it: 409 ``agent_offline``)."""
    async with db.begin():
        row = await db.get(TechSession, session_id)
        if row is None:
            raise NotFound("session not found")
        await lock_agent(db, row.agent_id)
        await db.refresh(row)
        if row.state != SessionState.PENDING.value:
            raise Conflict(f"session was {row.state} while opening ({row.close_reason})")
        conn = await db.get(AgentConnection, reply.conn_id)
        if conn is not None and conn.disconnected_at is not None:
            finish(
                db,
                row,
                state=SessionState.CLOSED,
                reason="agent_disconnected",
                actor=actor,
                detail={"conn_id": reply.conn_id, "gateway_id": reply.gateway_id},
            )
            outcome: ApiError | None = Conflict(
                "agent disconnected while opening", code=ErrorCode.AGENT_OFFLINE
            )
        else:
            row.state = SessionState.ACTIVE.value
            row.opened_at = utcnow()
            row.conn_id = reply.conn_id
            row.gateway_id = reply.gateway_id
            record(
                db,
                actor=actor,
                action=AuditAction.SESSION_ACTIVE,
                agent_id=row.agent_id,
                session_id=row.id,
                detail={"conn_id": reply.conn_id, "gateway_id": reply.gateway_id},
            )
            outcome = None
    if outcome is not None:
        raise outcome
    return row


async def close_session(
    db: AsyncSession, *, bus: Bus, settings: ApiSettings, session_id: str, tech: Technician
) -> TechSession:
    """Close by the owner or an admin (403 for others); idempotent on a finished session."""
    async with db.begin():
        row = await db.get(TechSession, session_id)
        if row is None:
            raise NotFound("session not found")
        if row.tech_id != tech.id and tech.role != Role.ADMIN.value:
            raise Forbidden("only the owner or an admin may close this session")
        await lock_agent(db, row.agent_id)
        await db.refresh(row)
        changed = row.state in {s.value for s in OPEN_STATES}
        if changed:
            finish(db, row, state=SessionState.CLOSED, reason="user", actor=tech.id)
    if changed:
        bus.send_best_effort(
            row.agent_id,
            TunnelClose(req_id=new_id(), session_id=row.id, reason="user"),
            settings.close_timeout_s,
        )
    return row


async def get_session(db: AsyncSession, *, session_id: str) -> TechSession:
    async with db.begin():
        row = await db.get(TechSession, session_id)
    if row is None:
        raise NotFound("session not found")
    return row


async def list_sessions(
    db: AsyncSession,
    *,
    agent_id: str | None,
    state: SessionState | None,
    tech_id: str | None,
    limit: int,
    offset: int,
) -> tuple[Sequence[TechSession], int]:
    query = select(TechSession)
    if agent_id is not None:
        query = query.where(col(TechSession.agent_id) == agent_id)
    if state is not None:
        query = query.where(col(TechSession.state) == state.value)
    if tech_id is not None:
        query = query.where(col(TechSession.tech_id) == tech_id)
    async with db.begin():
        count = await db.scalar(select(func.count()).select_from(query.subquery()))
        rows = await db.scalars(
            query.order_by(col(TechSession.created_at).desc(), col(TechSession.id))
            .limit(limit)
            .offset(offset)
        )
        return list(rows), int(count or 0)
