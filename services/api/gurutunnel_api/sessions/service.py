"""The session state machine: open, activate, close, the stale-pending sweep, and the helpers
presence handlers share.

Contract (docs/design.md "Sessions (api)"):
- ``open_session`` locks the agent row and inserts ``pending`` (+ audit ``session.open``); the
  partial unique index makes a concurrent second open an IntegrityError -> 409
  ``session_exists``, unless the blocking row is a ``pending`` left behind by an open that could
  no longer be running (older than ``open_timeout_s + close_timeout_s``): that one is failed
  (``open_timeout``, audited, ``tunnel.close`` sent) and the open goes on. It then requests
  ``tunnel.open`` with ``open_timeout_s``; on ``tunnel.ready`` ``activate`` marks it ``active``
  bound to the reply's ``conn_id``/``gateway_id`` (+ ``session.active``).
- Every failure maps through the one table :func:`..errors.failure_for` to (close reason, HTTP
  answer): no responders -> ``failed/agent_offline``, 409; no answer -> ``failed/open_timeout``,
  504; bus down -> ``failed/bus_unavailable``, 503; ``tunnel.error{tunnel_busy}`` ->
  ``failed/agent_busy``, 409 ``agent_busy``; anything else ``failed/agent_error``, 502.
- Whenever the ``tunnel.open`` may have reached the agent (every failure but "no responders",
  a failed activation, a cancelled open, a swept stale row), a best-effort ``tunnel.close`` tells
  it to leave tunnel mode. ``tunnel_busy`` naming a held session while the database has no open
  session for the agent means the agent holds a zombie: it is told to close that one too.
- A cancelled open (client gone, shutdown) fails its row with ``cancelled`` from a shielded
  task on a fresh database session, bounded by ``request_timeout_s``, and sends ``tunnel.close``
  unless the row had already become active.
- ``activate`` locks the agent row (as the presence handlers do), so activation and presence are
  serialised per agent: activation on a connection already recorded as disconnected closes the
  session at once (``agent_disconnected``) and the open answers 409 ``agent_offline``; an agent
  revoked meanwhile closes it (``revoked``) and the open answers 409 ``conflict``.
- ``close_session`` (owner or admin) closes in the database first and tells the agent
  best-effort afterwards; closing a closed session returns it unchanged.
- Every state change writes exactly one audit row in its own transaction.
- The units of work of every open and user close (insert ``pending``, activate, close) are Core
  statements built once at import (no ORM unit of work, no per-call statement cache key);
  ``activate`` falls back to the ORM path only when it cannot simply activate.
- No ORM object is read after a rollback (a rollback expires them, and a lazy load outside the
  greenlet fails): callers' ``Technician`` rows are reduced to plain ids before any transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, bindparam, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
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
from ..audit.models import SYSTEM_ACTOR, AuditAction, TunnelAudit
from ..audit.service import insert_row, record
from ..auth.models import Role, Technician
from ..bus import AgentOffline, Bus, BusError
from ..config import ApiSettings
from ..db import utcnow
from ..errors import (
    AgentFailed,
    ApiError,
    Conflict,
    Forbidden,
    NotFound,
    failure_for,
    session_exists,
)
from .models import OPEN_STATES, SessionState, TechSession

log = logging.getLogger(__name__)

_SESSION_COLUMNS = tuple(TechSession.metadata.tables["tech_session"].columns)
"""Every column of ``tech_session``: a ``RETURNING`` that rebuilds the row without a SELECT."""

# The statements of open and close, built once: SQLAlchemy memoizes a statement's cache key on
# it, so a call neither rebuilds nor re-traverses them. SET/VALUES columns come from the
# parameters' keys; WHERE parameters end in "_" (a SET column's name is reserved).
_AGENT_REVOKED_FOR_UPDATE = (
    select(col(Agent.revoked_at)).where(col(Agent.id) == bindparam("agent_id_")).with_for_update()
)
_AGENT_REVOKED_AND_CONN_GONE_FOR_UPDATE = (
    select(
        col(Agent.revoked_at),
        select(col(AgentConnection.disconnected_at))
        .where(col(AgentConnection.conn_id) == bindparam("conn_id_"))
        .scalar_subquery(),
    )
    .where(col(Agent.id) == bindparam("agent_id_"))
    .with_for_update(of=Agent)
)
_INSERT_SESSION = insert(TechSession)
_ACTIVATE_PENDING = (
    update(TechSession)
    .where(
        col(TechSession.id) == bindparam("session_id_"),
        col(TechSession.state) == SessionState.PENDING.value,
    )
    .returning(*_SESSION_COLUMNS)
)
_OWNER_AND_AGENT = select(col(TechSession.tech_id), col(TechSession.agent_id)).where(
    col(TechSession.id) == bindparam("session_id_")
)
_CLOSE_OPEN = (
    update(TechSession)
    .where(
        col(TechSession.id) == bindparam("session_id_"),
        col(TechSession.state).in_([s.value for s in OPEN_STATES]),
    )
    .returning(*_SESSION_COLUMNS)
)
_SESSION_ROW = select(*_SESSION_COLUMNS).where(col(TechSession.id) == bindparam("session_id_"))


async def lock_agent(db: AsyncSession, agent_id: str) -> Agent | None:
    """Load the agent row locked for this transaction (``FOR UPDATE``; SQLite's ``BEGIN
    IMMEDIATE`` already serialises writers)."""
    return await db.get(Agent, agent_id, with_for_update=True, populate_existing=True)


async def finish(
    db: AsyncSession,
    row: TechSession,
    *,
    state: SessionState,
    reason: str,
    actor: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Move an open session to ``closed``/``failed`` and add its one audit row.

    The row of a session that was active carries its duration and traffic: commands run, output
    bytes, and bytes moved by completed uploads and downloads (from the session's audit rows)."""
    row.state = state.value
    row.close_reason = reason
    row.closed_at = utcnow()
    action = (
        AuditAction.SESSION_FAILED if state == SessionState.FAILED else AuditAction.SESSION_CLOSE
    )
    if row.opened_at is not None:
        detail = {**(detail or {}), **await _session_totals(db, row)}
    record(
        db,
        actor=actor,
        action=action,
        agent_id=row.agent_id,
        session_id=row.id,
        reason=reason,
        detail=detail,
    )


def _totals_statement() -> Select[int, int, int, int]:
    done = col(TunnelAudit.reason) == "done"
    upload = col(TunnelAudit.action) == AuditAction.FILE_UPLOAD.value
    download = col(TunnelAudit.action) == AuditAction.FILE_DOWNLOAD.value
    return select(
        func.count(case((col(TunnelAudit.action) == AuditAction.COMMAND_RUN.value, 1))),
        func.coalesce(
            func.sum(
                func.coalesce(col(TunnelAudit.stdout_bytes), 0)
                + func.coalesce(col(TunnelAudit.stderr_bytes), 0)
            ),
            0,
        ),
        func.coalesce(func.sum(case((upload & done, col(TunnelAudit.file_size)))), 0),
        func.coalesce(func.sum(case((download & done, col(TunnelAudit.file_size)))), 0),
    ).where(col(TunnelAudit.session_id) == bindparam("session_id_"))


# Built once: its cache key (a deep traversal of this tree) is memoized on the statement.
_TOTALS = _totals_statement()


async def _session_totals(db: AsyncSession, row: TechSession) -> dict[str, Any]:
    if row.opened_at is None or row.closed_at is None:
        return {}
    return await _totals(db, session_id=row.id, opened_at=row.opened_at, closed_at=row.closed_at)


async def _totals(
    db: AsyncSession | AsyncConnection,
    *,
    session_id: str,
    opened_at: datetime,
    closed_at: datetime,
) -> dict[str, Any]:
    commands, output, uploaded, downloaded = (
        await db.execute(_TOTALS, {"session_id_": session_id})
    ).one()
    return {
        "duration_s": round((closed_at - opened_at).total_seconds(), 3),
        "commands": int(commands),
        "output_bytes": int(output),
        "uploaded_bytes": int(uploaded),
        "downloaded_bytes": int(downloaded),
    }


async def close_open_sessions(
    db: AsyncSession,
    *,
    agent_id: str,
    reason: str,
    actor: str,
    conn_id: str | None = None,
    gateway_id: str | None = None,
    boot_id: str | None = None,
    on_conns_connected_before_seq: int | None = None,
    detail: dict[str, Any] | None = None,
) -> list[TechSession]:
    """Close the agent's open sessions matching the filters (caller holds the agent lock).

    ``conn_id`` / ``gateway_id``: only sessions bound to that connection / gateway.
    ``boot_id``: only sessions bound to a connection accepted under that gateway boot.
    ``on_conns_connected_before_seq``: only active sessions bound to a connection whose
    ``connected`` event has a lower stream sequence (a connection whose ``connected`` was not
    handled yet has no sequence and is left alone)."""
    query = select(TechSession).where(
        col(TechSession.agent_id) == agent_id,
        col(TechSession.state).in_([s.value for s in OPEN_STATES]),
    )
    if conn_id is not None:
        query = query.where(col(TechSession.conn_id) == conn_id)
    if gateway_id is not None:
        query = query.where(col(TechSession.gateway_id) == gateway_id)
    if boot_id is not None:
        boot_conns = select(col(AgentConnection.conn_id)).where(
            col(AgentConnection.agent_id) == agent_id, col(AgentConnection.boot_id) == boot_id
        )
        query = query.where(col(TechSession.conn_id).in_(boot_conns))
    if on_conns_connected_before_seq is not None:
        older_conns = select(col(AgentConnection.conn_id)).where(
            col(AgentConnection.agent_id) == agent_id,
            col(AgentConnection.connected_seq) < on_conns_connected_before_seq,
        )
        query = query.where(
            col(TechSession.state) == SessionState.ACTIVE.value,
            col(TechSession.conn_id).in_(older_conns),
        )
    rows = list(await db.scalars(query.execution_options(populate_existing=True)))
    for row in rows:
        await finish(db, row, state=SessionState.CLOSED, reason=reason, actor=actor, detail=detail)
    return rows


async def _insert_pending(db: AsyncSession, *, agent_id: str, tech_id: str) -> str:
    """Insert the ``pending`` row (agent row locked, so a concurrent revoke is either seen here
    or sees this row) and its ``session.open`` audit row; its id. Core statements: no ORM
    object is needed, and this runs on every open."""
    async with db.begin():
        conn = await db.connection()
        agent = (await conn.execute(_AGENT_REVOKED_FOR_UPDATE, {"agent_id_": agent_id})).first()
        if agent is None:
            raise NotFound("agent not found")
        if agent[0] is not None:
            raise Conflict("agent is revoked")
        session_id = new_id()
        # a second open of the agent fails here on the partial unique index (IntegrityError)
        await conn.execute(
            _INSERT_SESSION,
            {
                "id": session_id,
                "agent_id": agent_id,
                "tech_id": tech_id,
                "state": SessionState.PENDING.value,
                "created_at": utcnow(),
            },
        )
        await insert_row(
            conn,
            actor=tech_id,
            action=AuditAction.SESSION_OPEN,
            agent_id=agent_id,
            session_id=session_id,
        )
    return session_id


async def fail_stale_pending(db: AsyncSession, *, agent_id: str, older_than: datetime) -> list[str]:
    """Fail the agent's ``pending`` sessions created before ``older_than`` (left behind by a
    crashed or cancelled open: no open takes that long); the ids of the failed ones."""
    async with db.begin():
        await lock_agent(db, agent_id)
        rows = list(
            await db.scalars(
                select(TechSession)
                .where(
                    col(TechSession.agent_id) == agent_id,
                    col(TechSession.state) == SessionState.PENDING.value,
                    col(TechSession.created_at) < older_than,
                )
                .execution_options(populate_existing=True)
            )
        )
        for row in rows:
            await finish(
                db, row, state=SessionState.FAILED, reason="open_timeout", actor=SYSTEM_ACTOR
            )
        return [row.id for row in rows]


def stale_pending_cutoff(settings: ApiSettings) -> datetime:
    """Created before this instant, a ``pending`` row cannot belong to a running open."""
    return utcnow() - timedelta(seconds=settings.open_timeout_s + settings.close_timeout_s)


async def sweep_stale_pending(
    sessionmaker: async_sessionmaker[AsyncSession], *, bus: Bus, settings: ApiSettings
) -> int:
    """Fail stale ``pending`` rows of at most ``pending_sweep_batch`` agents (audited) and tell
    each agent to close them; how many were failed."""
    cutoff = stale_pending_cutoff(settings)
    failed = 0
    async with sessionmaker() as db:
        async with db.begin():
            agent_ids = list(
                await db.scalars(
                    select(col(TechSession.agent_id))
                    .where(
                        col(TechSession.state) == SessionState.PENDING.value,
                        col(TechSession.created_at) < cutoff,
                    )
                    .distinct()
                    .limit(settings.pending_sweep_batch)
                )
            )
        for agent_id in agent_ids:
            session_ids = await fail_stale_pending(db, agent_id=agent_id, older_than=cutoff)
            for session_id in session_ids:
                log.info(
                    "stale pending session failed",
                    extra={"agent_id": agent_id, "session_id": session_id},
                )
                tell_agent_to_close(bus, settings, agent_id, session_id, reason="open_failed")
            failed += len(session_ids)
    return failed


def tell_agent_to_close(
    bus: Bus, settings: ApiSettings, agent_id: str, session_id: str, *, reason: str
) -> None:
    """Best-effort ``tunnel.close``: the database state never depends on the agent."""
    bus.send_best_effort(
        agent_id,
        TunnelClose(req_id=new_id(), session_id=session_id, reason=reason),
        settings.close_timeout_s,
    )


async def _fail_pending(
    db: AsyncSession, *, session_id: str, reason: str, actor: str, detail: dict[str, Any] | None
) -> str | None:
    """Fail the session if it is still ``pending``; the state it was found in (None: no row)."""
    async with db.begin():
        row = await db.get(TechSession, session_id)
        if row is None:
            return None
        await lock_agent(db, row.agent_id)
        await db.refresh(row)
        found = row.state
        if found == SessionState.PENDING.value:
            await finish(
                db, row, state=SessionState.FAILED, reason=reason, actor=actor, detail=detail
            )
        return found


# shielded clean-ups of cancelled opens, kept referenced until they finish
_CLEANUPS: set[asyncio.Task[None]] = set()


async def _abandon_open(
    db: AsyncSession,
    *,
    bus: Bus,
    settings: ApiSettings,
    agent_id: str,
    session_id: str,
    tech_id: str,
) -> None:
    """The open was cancelled: fail the row (``cancelled``) on a fresh database session (the
    request's may be mid-statement) and tell the agent to leave, unless it became active."""
    found: str | None = None
    try:
        async with AsyncSession(bind=db.bind, expire_on_commit=False) as fresh:
            found = await asyncio.wait_for(
                _fail_pending(
                    fresh, session_id=session_id, reason="cancelled", actor=tech_id, detail=None
                ),
                settings.request_timeout_s,
            )
    except Exception:
        # the sweeper fails the row later; the agent is still told to leave below
        log.warning(
            "cancelled open not recorded as failed",
            exc_info=True,
            extra={"agent_id": agent_id, "session_id": session_id},
        )
    if found != SessionState.ACTIVE.value:
        tell_agent_to_close(bus, settings, agent_id, session_id, reason="open_failed")


async def open_session(
    db: AsyncSession, *, bus: Bus, settings: ApiSettings, agent_id: str, tech: Technician
) -> TechSession:
    """Open a tunnel session on ``agent_id`` for ``tech`` (see the module contract)."""
    tech_id = tech.id  # read once: a rollback below expires ``tech``
    try:
        session_id = await _insert_pending(db, agent_id=agent_id, tech_id=tech_id)
    except IntegrityError:
        reaped = await fail_stale_pending(
            db, agent_id=agent_id, older_than=stale_pending_cutoff(settings)
        )
        if not reaped:
            raise session_exists() from None
        for stale_id in reaped:
            tell_agent_to_close(bus, settings, agent_id, stale_id, reason="open_failed")
        try:
            session_id = await _insert_pending(db, agent_id=agent_id, tech_id=tech_id)
        except IntegrityError:
            raise session_exists() from None

    try:
        return await _open_on_agent(
            db,
            bus=bus,
            settings=settings,
            agent_id=agent_id,
            tech_id=tech_id,
            session_id=session_id,
        )
    except Exception:
        raise
    except BaseException:
        # cancelled (client gone, shutdown) while the agent may be entering tunnel mode
        task = asyncio.create_task(
            _abandon_open(
                db,
                bus=bus,
                settings=settings,
                agent_id=agent_id,
                session_id=session_id,
                tech_id=tech_id,
            )
        )
        _CLEANUPS.add(task)
        task.add_done_callback(_CLEANUPS.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
        raise


async def _open_on_agent(
    db: AsyncSession,
    *,
    bus: Bus,
    settings: ApiSettings,
    agent_id: str,
    tech_id: str,
    session_id: str,
) -> TechSession:
    """Request ``tunnel.open`` for the pending ``session_id`` and activate it, or fail it."""
    try:
        reply = await bus.request_agent(
            agent_id,
            TunnelOpen(req_id=new_id(), session_id=session_id, tech_id=tech_id),
            settings.open_timeout_s,
        )
    except BusError as exc:
        failure = failure_for(exc.code)
        try:
            await _fail_pending(
                db, session_id=session_id, reason=failure.reason, actor=tech_id, detail=None
            )
        finally:
            if not isinstance(exc, AgentOffline):
                # delivered or not, we cannot tell (a late agent, a lost reply): tell it to leave
                tell_agent_to_close(bus, settings, agent_id, session_id, reason="open_failed")
        raise failure.error() from None

    answer = reply.frame
    if isinstance(answer, TunnelError):
        failure = failure_for(answer.code)
        await _fail_pending(
            db,
            session_id=session_id,
            reason=failure.reason,
            actor=tech_id,
            detail={"code": answer.code.value},
        )
        if answer.code == ErrorCode.TUNNEL_BUSY:
            await _close_zombie(
                db,
                bus=bus,
                settings=settings,
                agent_id=agent_id,
                session_id=session_id,
                held_session_id=answer.held_session_id,
            )
        raise failure.error()
    if not isinstance(answer, TunnelReady) or answer.session_id != session_id:
        try:
            await _fail_pending(
                db,
                session_id=session_id,
                reason=failure_for(ErrorCode.AGENT_ERROR).reason,
                actor=tech_id,
                detail={"answer": answer.type},
            )
        finally:
            tell_agent_to_close(bus, settings, agent_id, session_id, reason="open_failed")
        raise AgentFailed(f"unexpected answer from the agent ({answer.type})")

    try:
        return await activate(
            db, session_id=session_id, reply=reply, actor=tech_id, agent_id=agent_id
        )
    except Exception:
        # not activated (closed meanwhile, connection gone, revoked, database failure) although
        # the agent entered tunnel mode: tell it to leave
        tell_agent_to_close(bus, settings, agent_id, session_id, reason="open_failed")
        raise


async def _close_zombie(
    db: AsyncSession,
    *,
    bus: Bus,
    settings: ApiSettings,
    agent_id: str,
    session_id: str,
    held_session_id: str | None,
) -> None:
    """The agent is busy with ``held_session_id``; if the database knows no open session of the
    agent (besides the one being opened), that session is a zombie: tell the agent to close it."""
    if held_session_id is None or held_session_id == session_id:
        return
    async with db.begin():
        other = await db.scalar(
            select(col(TechSession.id))
            .where(
                col(TechSession.agent_id) == agent_id,
                col(TechSession.state).in_([s.value for s in OPEN_STATES]),
                col(TechSession.id) != session_id,
            )
            .limit(1)
        )
    if other is None:
        log.warning(
            "agent holds a session the database does not know open; closing it",
            extra={"agent_id": agent_id, "session_id": held_session_id},
        )
        tell_agent_to_close(bus, settings, agent_id, held_session_id, reason="zombie")


async def activate(
    db: AsyncSession, *, session_id: str, reply: CommandReply, actor: str, agent_id: str
) -> TechSession:
    """Mark the pending session ``session_id`` of ``agent_id`` active on the replying
    connection, unless that connection is already known to be gone (then close it: 409
    ``agent_offline``) or the agent was revoked meanwhile (then close it: 409 ``conflict``).

    The usual case is one transaction of Core statements: lock the agent row (reading its
    revocation and the connection's end in the same statement), move the row from ``pending``
    to ``active`` (``RETURNING`` it) and insert ``session.active``. Any other case takes
    :func:`_activate_refused`."""
    bound = {"conn_id": reply.conn_id, "gateway_id": reply.gateway_id}
    async with db.begin():
        conn = await db.connection()
        agent = (
            await conn.execute(
                _AGENT_REVOKED_AND_CONN_GONE_FOR_UPDATE,
                {"agent_id_": agent_id, "conn_id_": reply.conn_id},
            )
        ).first()
        row = None
        if agent is not None and agent[0] is None and agent[1] is None:
            row = (
                await conn.execute(
                    _ACTIVATE_PENDING,
                    {
                        "session_id_": session_id,
                        "state": SessionState.ACTIVE.value,
                        "opened_at": utcnow(),
                        **bound,
                    },
                )
            ).first()
        if row is not None:
            await insert_row(
                conn,
                actor=actor,
                action=AuditAction.SESSION_ACTIVE,
                agent_id=agent_id,
                session_id=session_id,
                detail=bound,
            )
            return TechSession(**row._mapping)
    return await _activate_refused(db, session_id=session_id, bound=bound, actor=actor)


async def _activate_refused(
    db: AsyncSession, *, session_id: str, bound: dict[str, Any], actor: str
) -> TechSession:
    """The session could not simply be activated: no longer ``pending`` (409 naming its state),
    the agent revoked or the connection gone meanwhile (closed, 409), or activated after all
    (returned) when the blocking condition vanished between the two transactions."""
    outcome: ApiError | None = None
    async with db.begin():
        row = await db.get(TechSession, session_id, populate_existing=True)
        if row is None:
            raise NotFound("session not found")
        agent = await lock_agent(db, row.agent_id)
        await db.refresh(row)
        if row.state != SessionState.PENDING.value:
            raise Conflict(f"session was {row.state} while opening ({row.close_reason})")
        conn = await db.get(AgentConnection, bound["conn_id"], populate_existing=True)
        if agent is None or agent.revoked_at is not None:
            await finish(
                db, row, state=SessionState.CLOSED, reason="revoked", actor=actor, detail=bound
            )
            outcome = Conflict("agent was revoked while opening")
        elif conn is not None and conn.disconnected_at is not None:
            await finish(
                db,
                row,
                state=SessionState.CLOSED,
                reason="agent_disconnected",
                actor=actor,
                detail=bound,
            )
            outcome = Conflict("agent disconnected while opening", code=ErrorCode.AGENT_OFFLINE)
        else:
            row.state = SessionState.ACTIVE.value
            row.opened_at = utcnow()
            row.conn_id = bound["conn_id"]
            row.gateway_id = bound["gateway_id"]
            record(
                db,
                actor=actor,
                action=AuditAction.SESSION_ACTIVE,
                agent_id=row.agent_id,
                session_id=row.id,
                detail=bound,
            )
    if outcome is not None:
        raise outcome
    return row


async def close_session(
    db: AsyncSession, *, bus: Bus, settings: ApiSettings, session_id: str, tech: Technician
) -> TechSession:
    """Close by the owner or an admin (403 for others); idempotent on a finished session.

    One transaction of Core statements: read the owner, lock the agent row (PostgreSQL; SQLite's
    ``BEGIN IMMEDIATE`` already holds the write lock), move an open row to ``closed``
    (``RETURNING`` it) with its ``session.close`` row and totals, as :func:`finish` does."""
    tech_id, is_admin = tech.id, tech.role == Role.ADMIN.value  # plain values: see the contract
    async with db.begin():
        conn = await db.connection()
        found = (await conn.execute(_OWNER_AND_AGENT, {"session_id_": session_id})).first()
        if found is None:
            raise NotFound("session not found")
        if found[0] != tech_id and not is_admin:
            raise Forbidden("only the owner or an admin may close this session")
        agent_id = found[1]
        if conn.dialect.name != "sqlite":
            await conn.execute(_AGENT_REVOKED_FOR_UPDATE, {"agent_id_": agent_id})
        closed = (
            await conn.execute(
                _CLOSE_OPEN,
                {
                    "session_id_": session_id,
                    "state": SessionState.CLOSED.value,
                    "close_reason": "user",
                    "closed_at": utcnow(),
                },
            )
        ).first()
        if closed is None:
            # already finished: returned unchanged
            row = (await conn.execute(_SESSION_ROW, {"session_id_": session_id})).one()
        else:
            row = closed
            detail: dict[str, Any] | None = None
            if row.opened_at is not None:
                detail = await _totals(
                    conn, session_id=session_id, opened_at=row.opened_at, closed_at=row.closed_at
                )
            await insert_row(
                conn,
                actor=tech_id,
                action=AuditAction.SESSION_CLOSE,
                agent_id=agent_id,
                session_id=session_id,
                reason="user",
                detail=detail,
            )
    if closed is not None:
        tell_agent_to_close(bus, settings, agent_id, session_id, reason="user")
    return TechSession(**row._mapping)


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
