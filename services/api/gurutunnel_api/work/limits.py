"""Session limits: the reaper closing sessions past the idle timeout or the maximum duration.

Contract:
- Activity is ``tech_session.last_activity_at`` (exec, shell open, input, resize, cancel; not
  keepalives, not reads); a session with none counts from ``opened_at``. A session with a
  command or a file transfer still running (its audit row not yet completed) is not idle,
  however long the work takes; the maximum duration still applies.
- Every ``session_reap_interval_s`` the reaper closes (state ``closed``) at most
  ``session_reap_batch`` active sessions with reason ``max_duration`` (open longer than
  ``session_max_duration_s``; checked first) or ``idle_timeout`` (no activity for
  ``session_idle_timeout_s``). Each close locks the agent row (as every session transition
  does), re-checks the row, writes one audit row (actor ``system``) in the same transaction, and
  then tells the agent best-effort (``tunnel.close`` with the reason). WebSockets and running
  commands notice through their session watch.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from ..audit.models import SYSTEM_ACTOR, AuditAction, TunnelAudit
from ..bus import Bus
from ..config import ApiSettings
from ..db import utcnow
from ..sessions.models import SessionState, TechSession
from ..sessions.service import finish, lock_agent, tell_agent_to_close

log = logging.getLogger(__name__)

IDLE_TIMEOUT = "idle_timeout"
MAX_DURATION = "max_duration"


def _reason(row: TechSession, *, idle_cutoff: datetime, max_cutoff: datetime) -> str | None:
    opened = row.opened_at or row.created_at
    if opened < max_cutoff:
        return MAX_DURATION
    last = row.last_activity_at or opened
    if last < idle_cutoff:
        return IDLE_TIMEOUT
    return None


RUNNING_WORK = (AuditAction.COMMAND_RUN, AuditAction.FILE_UPLOAD, AuditAction.FILE_DOWNLOAD)


async def _work_running(db: AsyncSession, session_id: str) -> bool:
    """A command or transfer of the session has not ended (its audit row is still open)."""
    running = await db.scalar(
        select(func.count())
        .select_from(TunnelAudit)
        .where(
            col(TunnelAudit.session_id) == session_id,
            col(TunnelAudit.action).in_([a.value for a in RUNNING_WORK]),
            col(TunnelAudit.ended_at).is_(None),
        )
    )
    return bool(running)


async def reap_sessions(
    sessionmaker: async_sessionmaker[AsyncSession], *, bus: Bus, settings: ApiSettings
) -> int:
    """Close the active sessions past a limit (see the module contract); how many."""
    now = utcnow()
    idle_cutoff = now - timedelta(seconds=settings.session_idle_timeout_s)
    max_cutoff = now - timedelta(seconds=settings.session_max_duration_s)
    closed = 0
    async with sessionmaker() as db:
        async with db.begin():
            candidates = list(
                (
                    await db.execute(
                        select(col(TechSession.id), col(TechSession.agent_id))
                        .where(
                            col(TechSession.state) == SessionState.ACTIVE.value,
                            or_(
                                col(TechSession.opened_at) < max_cutoff,
                                col(TechSession.last_activity_at) < idle_cutoff,
                                and_(
                                    col(TechSession.last_activity_at).is_(None),
                                    col(TechSession.opened_at) < idle_cutoff,
                                ),
                            ),
                        )
                        .limit(settings.session_reap_batch)
                    )
                ).all()
            )
        for session_id, agent_id in candidates:
            reason: str | None = None
            async with db.begin():
                await lock_agent(db, agent_id)
                row = await db.get(TechSession, session_id, populate_existing=True)
                if row is not None and row.state == SessionState.ACTIVE.value:
                    reason = _reason(row, idle_cutoff=idle_cutoff, max_cutoff=max_cutoff)
                    if reason == IDLE_TIMEOUT and await _work_running(db, session_id):
                        reason = None
                    if reason is not None:
                        await finish(
                            db, row, state=SessionState.CLOSED, reason=reason, actor=SYSTEM_ACTOR
                        )
            if reason is not None:
                closed += 1
                log.info(
                    "session closed by its limit",
                    extra={"agent_id": agent_id, "session_id": session_id, "code": reason},
                )
                tell_agent_to_close(bus, settings, agent_id, session_id, reason=reason)
    return closed


async def run_reaper(
    sessionmaker: async_sessionmaker[AsyncSession], *, bus: Bus, settings: ApiSettings
) -> None:
    """Reap forever (until cancelled); a failed round is logged and the next one tries again."""
    bound_s = settings.request_timeout_s * (2 + 2 * settings.session_reap_batch)
    while True:
        await asyncio.sleep(settings.session_reap_interval_s)
        try:
            await asyncio.wait_for(reap_sessions(sessionmaker, bus=bus, settings=settings), bound_s)
        except Exception as exc:
            log.warning("session reap failed", extra={"error": type(exc).__name__})
