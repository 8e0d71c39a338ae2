"""Work inside a session: who may act, audit before send, one command from start to exit.

Contract:
- ``authorize(db, session_id, tech)``: 403 ``forbidden`` unless the technician's role is admin or
  tech (a viewer never acts), 404 ``not_found`` for no such session, 403 ``forbidden``
  unless the technician owns it or is an admin, 409 ``conflict`` "session is <state>" unless it
  is ``active``. It returns plain ids (:class:`SessionRef`), never an ORM row.
- ``begin_audit`` writes and COMMITS the ``command.run`` / ``shell.open`` row (and records the
  session's activity) before anything is sent; any database failure there is 503
  ``database_unavailable`` and nothing is sent; a session no longer active (the reaper closed
  it after ``authorize``) is 409 ``conflict`` "session is <state>", rolled back, nothing sent.
  ``authorize_and_audit`` is ``authorize`` and ``begin_audit`` in ONE transaction (the exec
  path, :func:`authorize_and_start`): the same 403/404/409 refusals with the same messages (and
  nothing written), the same 503, the row committed before anything is sent. On SQLite its
  ``BEGIN IMMEDIATE`` holds the write lock from the check to the commit; on PostgreSQL the
  activity ``UPDATE ... WHERE state = 'active'`` is the check, so a close that commits first
  is seen as 409.
  ``complete_audit`` fills in the end (exit reason or refusal code, exit code, duration, bytes,
  truncated) on a fresh database session, in one statement (no ``BEGIN`` on SQLite).
- ``start_command`` subscribes to ``session.<id>.up`` BEFORE it sends ``terminal.command``, then
  waits ``exec_start_timeout_s`` for ``terminal.started``. Refusals map through
  :func:`..errors.work_refusal` (409 ``agent_offline``, 422 ``cwd_not_allowed`` /
  ``invalid_command``, 429 ``too_many_channels``, 504 ``agent_timeout``); the audit row is then
  completed with the refusal code and the subscription closed.
- :class:`CommandRun` turns the channel's ``terminal.chunk``/``terminal.exit`` frames (first
  those the ``terminal.started`` answer carried, then the subscription's) into events:
  ``Chunk``, ``Gap`` (a jump in the channel's ``seq``; duplicates dropped), the
  ``TerminalExit`` itself (last event), or ``Lost`` (last event) when no exit frame came within
  ``timeout_s + exec_grace_s`` (``agent_timeout``) or within ``exec_close_grace_s`` after the
  session stopped being active (``session_closed``; checked every ``session_watch_interval_s``
  and on a ``tunnel.closed`` frame). Frames of other channels are ignored. A command ended by
  the session's close (exit reason or error ``session_closed``) carries the session's
  ``close_reason`` (``run.session_close_reason``: ``max_duration``, ``idle_timeout`` ...).
- A run that is abandoned before its end (client gone, reader stalled, response cancelled or
  never started: ``CommandRun.abandon()``, idempotent) publishes ``terminal.cancel`` and hands its
  subscription to a background task that waits at most ``exec_close_grace_s`` for the exit
  frame to complete the audit row (``client_gone`` when none came).
- Cancellation never leaves an audit row open or a subscription registered: the start's steps
  (``begin_audit`` or ``authorize_and_audit``, then the subscription) run under ``_guarded`` (a
  row or subscription acquired after the caller was cancelled is released in the background)
  and every end (exit, loss, abandonment, refusal) is one shielded background task.
- ``collect`` assembles a full result holding at most ``max_result_bytes`` of output
  (``truncated`` when more came).
- Output flow control: every command is sent with ``window_bytes = output_window_bytes`` and
  its output acknowledged with ``terminal.ack`` as it is consumed (:class:`OutputAcks`), when
  the agent's answer echoed the window: a :class:`CommandRun` counts a chunk consumed once its
  reader asks for the next event (the full result takes it at once; an NDJSON stream once the
  line was written), and on every ``session_watch_interval_s`` tick acknowledges again what
  did not go out, or past everything after a quiet tick (:meth:`OutputAcks.tick`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import bindparam, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlmodel import col

from gurutunnel_protocol import ErrorCode, new_id
from gurutunnel_protocol.messages import (
    CHUNK_COST_BYTES,
    ExitReason,
    Frame,
    OutputStream,
    TerminalAck,
    TerminalCancel,
    TerminalChunk,
    TerminalExit,
    TerminalStarted,
    TunnelClosed,
    TunnelError,
    chunk_cost,
)
from gurutunnel_protocol.messages import Terminal as TerminalCommand

from ..audit.models import AuditAction, TunnelAudit
from ..audit.service import insert_row, record
from ..auth.models import Role, Technician
from ..bus import Bus, BusError, FramesDropped, SessionSubscription
from ..config import ApiSettings
from ..db import unlocked, utcnow
from ..errors import (
    AgentFailed,
    Conflict,
    DatabaseUnavailable,
    Forbidden,
    GatewayTimeout,
    NotFound,
    Unauthorized,
    work_refusal,
)
from ..metrics import ApiMetrics
from ..sessions.models import SessionState, TechSession
from .models import WsTicket
from .schemas import CommandSpec, Encoding, ExecResult, GapPublic

log = logging.getLogger(__name__)

T = TypeVar("T")


# ---------------------------------------------------------------- runtime
class TaskSet:
    """Background tasks the application owns (cancelled at shutdown)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, timeout_s: float) -> None:
        """Cancel every task and wait for them, at most ``timeout_s`` (shutdown must end)."""
        await cancel_and_wait(list(self._tasks), timeout_s, what="background tasks")


async def cancel_and_wait(tasks: list[asyncio.Task[Any]], timeout_s: float, *, what: str) -> None:
    """Cancel ``tasks`` and wait for them to end, giving up (logged) after ``timeout_s``."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    if pending:
        log.warning(
            "%d %s still running %.0f s after cancel; shutdown goes on",
            len(pending),
            what,
            timeout_s,
        )


@dataclass
class WorkContext:
    """What work inside a session needs, built once by the lifespan."""

    settings: ApiSettings
    bus: Bus
    sessionmaker: async_sessionmaker[AsyncSession]
    background: TaskSet = field(default_factory=TaskSet)
    metrics: ApiMetrics = field(default_factory=ApiMetrics)


@dataclass(frozen=True, slots=True)
class SessionRef:
    session_id: str
    agent_id: str
    tech_id: str
    """The technician acting (owner or admin), not necessarily the session's owner."""


# ---------------------------------------------------------------- authorization and activity
ACTING_ROLES = frozenset({Role.ADMIN.value, Role.TECH.value})
"""Roles that may act inside a session (a viewer only reads)."""


async def authorize(db: AsyncSession, *, session_id: str, tech: Technician) -> SessionRef:
    """The active session ``session_id`` if ``tech`` may act in it (see the module contract)."""
    return await authorize_ids(db, session_id=session_id, tech_id=tech.id, role=tech.role)


async def authorize_ids(
    db: AsyncSession, *, session_id: str, tech_id: str, role: str
) -> SessionRef:
    if role not in ACTING_ROLES:
        raise Forbidden("only a technician or an admin may act in a session")
    async with db.begin():
        row = await db.get(TechSession, session_id, populate_existing=True)
        if row is None:
            raise NotFound("session not found")
        if row.tech_id != tech_id and role != Role.ADMIN.value:
            raise Forbidden("only the session's owner or an admin may act in it")
        if row.state != SessionState.ACTIVE.value:
            raise Conflict(f"session is {row.state}")
        return SessionRef(session_id=row.id, agent_id=row.agent_id, tech_id=tech_id)


async def may_still_act(
    sessionmaker: async_sessionmaker[AsyncSession], *, session_id: str, tech_id: str
) -> bool:
    """Whether ``tech_id`` still may act in ``session_id`` (exists, not disabled, role admin or
    tech, and owner unless admin): re-checked by a live WebSocket, whose ticket was checked
    once."""
    # two independent reads: no snapshot (nor SQLite's write lock) needed
    async with sessionmaker() as db, unlocked(db):
        tech = (
            await db.execute(
                select(col(Technician.role), col(Technician.disabled)).where(
                    col(Technician.id) == tech_id
                )
            )
        ).first()
        if tech is None or tech[1] or tech[0] not in ACTING_ROLES:
            return False
        if tech[0] == Role.ADMIN.value:
            return True
        owner = await db.scalar(
            select(col(TechSession.tech_id)).where(col(TechSession.id) == session_id)
        )
        return owner == tech_id


async def session_state(
    sessionmaker: async_sessionmaker[AsyncSession], session_id: str
) -> tuple[str, str | None] | None:
    """(state, close_reason) of the session, None when it does not exist."""
    async with sessionmaker() as db, unlocked(db):
        found = (
            await db.execute(
                select(col(TechSession.state), col(TechSession.close_reason)).where(
                    col(TechSession.id) == session_id
                )
            )
        ).first()
    return None if found is None else (found[0], found[1])


def _touch(db: AsyncSession, session_id: str) -> Any:
    return db.execute(
        update(TechSession)
        .where(
            col(TechSession.id) == session_id,
            col(TechSession.state) == SessionState.ACTIVE.value,
        )
        .values(last_activity_at=utcnow())
    )


async def record_activity(sessionmaker: async_sessionmaker[AsyncSession], session_id: str) -> None:
    """``last_activity_at = now`` on the active session (input, resize, cancel)."""
    async with sessionmaker() as db, unlocked(db):
        await _touch(db, session_id)


# ---------------------------------------------------------------- audit
# Built once (the cache key is memoized on the statement); SET columns come from the parameters.
_TOUCH_RETURNING = (
    update(TechSession)
    .where(
        col(TechSession.id) == bindparam("session_id_"),
        col(TechSession.state) == SessionState.ACTIVE.value,
    )
    .returning(col(TechSession.agent_id), col(TechSession.tech_id))
)
_STATE_AND_OWNER = select(col(TechSession.state), col(TechSession.tech_id)).where(
    col(TechSession.id) == bindparam("session_id_")
)
_COMPLETE_AUDIT = update(TunnelAudit).where(
    col(TunnelAudit.id) == bindparam("audit_id_"), col(TunnelAudit.ended_at).is_(None)
)


async def _claim_session(
    conn: AsyncConnection, *, session_id: str, tech_id: str, role: str | None
) -> str:
    """Record the activity of the active session in the caller's write transaction; its agent
    id. With ``role`` (the actor not authorized yet): 404 ``not_found``, 403 ``forbidden``
    unless owner or admin, 409 "session is <state>", in :func:`authorize_ids`'s order. Without
    (already authorized): 409 "session is <state>" when it is no longer active. The caller rolls
    back on any of these."""
    touched = (
        await conn.execute(
            _TOUCH_RETURNING, {"session_id_": session_id, "last_activity_at": utcnow()}
        )
    ).first()
    owner_ok = role is None or role == Role.ADMIN.value
    if touched is not None:
        if not owner_ok and touched[1] != tech_id:
            raise Forbidden("only the session's owner or an admin may act in it")
        return str(touched[0])
    found = (await conn.execute(_STATE_AND_OWNER, {"session_id_": session_id})).first()
    if role is not None:
        if found is None:
            raise NotFound("session not found")
        if not owner_ok and found[1] != tech_id:
            raise Forbidden("only the session's owner or an admin may act in it")
    # the reaper (or a close) got there first: roll back, send nothing
    raise Conflict(f"session is {found[0] if found is not None else 'closed'}")


def _database_unavailable(session_id: str, exc: BaseException) -> DatabaseUnavailable:
    # whatever the database's trouble (gone, read-only, table missing), no audit: no send
    log.warning(
        "audit row not written; nothing sent",
        extra={"session_id": session_id, "error": type(exc).__name__},
    )
    return DatabaseUnavailable("the audit row could not be written; nothing was sent")


async def begin_audit(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    ref: SessionRef,
    action: AuditAction,
    channel_id: str,
    detail: dict[str, Any] | None,
    columns: dict[str, Any] | None = None,
) -> int:
    """Write and commit the row (and the activity); 503 ``database_unavailable`` on failure,
    409 ``conflict`` "session is <state>" (rolled back) when the session is no longer active.
    ``columns`` sets more columns of the row (the file columns of a transfer)."""
    try:
        async with sessionmaker() as db, db.begin():
            conn = await db.connection()
            await _claim_session(conn, session_id=ref.session_id, tech_id=ref.tech_id, role=None)
            return await insert_row(
                conn,
                actor=ref.tech_id,
                action=action,
                agent_id=ref.agent_id,
                session_id=ref.session_id,
                detail=detail,
                columns={"channel_id": channel_id, **(columns or {})},
            )
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        raise _database_unavailable(ref.session_id, exc) from None


async def authorize_and_audit(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    session_id: str,
    tech_id: str,
    role: str,
    action: AuditAction,
    channel_id: str,
    detail: dict[str, Any] | None,
) -> tuple[SessionRef, int]:
    """:func:`authorize_ids` and :func:`begin_audit` in ONE transaction: the same refusals
    (403/404/409, nothing written) and the same 503; the ref and the committed row's id."""
    if role not in ACTING_ROLES:
        raise Forbidden("only a technician or an admin may act in a session")
    try:
        async with sessionmaker() as db, db.begin():
            conn = await db.connection()
            agent_id = await _claim_session(conn, session_id=session_id, tech_id=tech_id, role=role)
            audit_id = await insert_row(
                conn,
                actor=tech_id,
                action=action,
                agent_id=agent_id,
                session_id=session_id,
                detail=detail,
                columns={"channel_id": channel_id},
            )
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        raise _database_unavailable(session_id, exc) from None
    return SessionRef(session_id=session_id, agent_id=agent_id, tech_id=tech_id), audit_id


async def complete_audit(
    sessionmaker: async_sessionmaker[AsyncSession],
    audit_id: int,
    *,
    reason: str,
    exit_frame: TerminalExit | None = None,
    truncated: bool | None = None,
    columns: dict[str, Any] | None = None,
) -> None:
    """Fill in the end of a ``command.run`` (or file transfer) row (logged, never raised: the
    work is over); ``columns`` sets more columns."""
    values: dict[str, Any] = {"ended_at": utcnow(), "reason": reason[:64], **(columns or {})}
    if exit_frame is not None:
        values |= {
            "exit_code": exit_frame.exit_code,
            "duration_s": exit_frame.duration_s,
            "stdout_bytes": exit_frame.stdout_bytes,
            "stderr_bytes": exit_frame.stderr_bytes,
            "truncated": exit_frame.truncated if truncated is None else truncated,
        }
    try:
        # one statement: its own transaction, no BEGIN IMMEDIATE round trips on SQLite
        async with sessionmaker() as db, unlocked(db):
            conn = await db.connection()
            await conn.execute(_COMPLETE_AUDIT, {"audit_id_": audit_id, **values})
    except Exception as exc:
        log.warning("audit row not completed", extra={"error": type(exc).__name__})


async def record_shell_close(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    ref: SessionRef,
    channel_id: str,
    reason: str,
    exit_frame: TerminalExit | None,
) -> None:
    """The ``shell.close`` row of a shell channel (logged, never raised)."""
    try:
        async with sessionmaker() as db, db.begin():
            row = record(
                db,
                actor=ref.tech_id,
                action=AuditAction.SHELL_CLOSE,
                agent_id=ref.agent_id,
                session_id=ref.session_id,
                reason=reason[:64],
            )
            row.channel_id = channel_id
            row.ended_at = utcnow()
            if exit_frame is not None:
                row.exit_code = exit_frame.exit_code
                row.duration_s = exit_frame.duration_s
                row.stdout_bytes = exit_frame.stdout_bytes
                row.stderr_bytes = exit_frame.stderr_bytes
                row.truncated = exit_frame.truncated
    except Exception as exc:
        log.warning("shell.close audit row not written", extra={"error": type(exc).__name__})


def command_detail(spec: CommandSpec) -> dict[str, Any]:
    detail: dict[str, Any] = {"timeout_s": spec.timeout_s}
    if spec.command is not None:
        detail["command"] = spec.command
    if spec.argv is not None:
        detail["argv"] = spec.argv
    if spec.cwd is not None:
        detail["cwd"] = spec.cwd
    if spec.max_output_bytes is not None:
        detail["max_output_bytes"] = spec.max_output_bytes
    return detail


async def running_command_exists(db: AsyncSession, *, session_id: str, channel_id: str) -> bool:
    """A ``command.run`` row of this session and channel that has not ended."""
    async with unlocked(db):
        found = await db.scalar(
            select(col(TunnelAudit.id))
            .where(
                col(TunnelAudit.session_id) == session_id,
                col(TunnelAudit.channel_id) == channel_id,
                col(TunnelAudit.action) == AuditAction.COMMAND_RUN.value,
                col(TunnelAudit.ended_at).is_(None),
            )
            .limit(1)
        )
    return found is not None


# ---------------------------------------------------------------- tickets
def _ticket_hash(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()


async def issue_ticket(db: AsyncSession, *, ref: SessionRef, ttl_s: float) -> str:
    """A single-use ticket for the WebSocket of ``ref`` (only its SHA-256 is stored)."""
    ticket = secrets.token_urlsafe(32)
    now = utcnow()
    async with db.begin():
        db.add(
            WsTicket(
                token_hash=_ticket_hash(ticket),
                tech_id=ref.tech_id,
                session_id=ref.session_id,
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_s),
            )
        )
    return ticket


async def redeem_ticket(db: AsyncSession, *, ticket: str, session_id: str) -> tuple[str, str]:
    """Use the ticket once: (tech_id, role) or ``Unauthorized`` naming why (the reason
    never contains the ticket)."""
    token_hash = _ticket_hash(ticket)
    now = utcnow()
    async with db.begin():
        used = await db.execute(
            update(WsTicket)
            .where(col(WsTicket.token_hash) == token_hash, col(WsTicket.used_at).is_(None))
            .values(used_at=now)
        )
        row = await db.get(WsTicket, token_hash, populate_existing=True)
        if row is None:
            raise Unauthorized("unknown ticket")
        if getattr(used, "rowcount", 0) != 1:
            raise Unauthorized("ticket already used")
        if row.expires_at <= now:
            raise Unauthorized("ticket expired")
        if row.session_id != session_id:
            raise Unauthorized("ticket is for another session")
        tech = await db.get(Technician, row.tech_id)
        if tech is None or tech.disabled:
            raise Unauthorized("technician unknown or disabled")
        return tech.id, tech.role


# ---------------------------------------------------------------- per-channel ordering
@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    stream: OutputStream
    data: bytes


@dataclass(frozen=True, slots=True)
class Gap:
    from_seq: int
    to_seq: int


@dataclass(frozen=True, slots=True)
class Lost:
    """The API lost the command: no exit frame within its bound."""

    code: ErrorCode
    message: str


Event = Chunk | Gap | TerminalExit | Lost


class ChannelTracker:
    """Orders one channel's frames by ``seq``: a jump is a ``Gap``, a repeat is dropped."""

    def __init__(self, channel_id: str) -> None:
        self.channel_id = channel_id
        self.expected = 0
        self.gaps: list[Gap] = []
        self.ended = False

    def accept(self, frame: TerminalChunk | TerminalExit) -> list[Event]:
        if self.ended or frame.seq < self.expected:
            return []
        events: list[Event] = []
        if frame.seq > self.expected:
            gap = Gap(self.expected, frame.seq - 1)
            self.gaps.append(gap)
            events.append(gap)
        self.expected = frame.seq + 1
        if isinstance(frame, TerminalExit):
            self.ended = True
            events.append(frame)
        else:
            events.append(Chunk(frame.seq, frame.stream, frame.data))
        return events


class OutputAcks:
    """The receiving end of one channel's output window (``terminal.ack``; the contract is in
    ``gurutunnel_protocol.messages.terminal``), for a channel whose agent echoed the window.

    - :meth:`arrived` for each chunk as it comes off the bus, :meth:`gap` for a jump in ``seq``,
      :meth:`consumed` once the chunk was handed on: it returns the ``seq`` to acknowledge once
      a quarter of the window was consumed since the last ack, and at once for the first chunk
      past a gap (lost frames hold window on the agent that only an ack past them frees).
    - :meth:`tick` on every watch tick returns what to acknowledge: the last consumed ``seq``
      while its ack has not gone out (:meth:`published` was not called for it); and, while
      nothing arrives and everything that did was consumed, a ``seq`` past anything the agent
      can have sent, after 1, 2, 4, 8, 16 and then every 32 quiet ticks. Frames or acks lost at
      the end of a burst (a NATS reconnect) would otherwise leave the agent waiting for good;
      this frees only window the reader already took, plus at most a window's worth still in
      flight (an ack frees frames already sent, never later ones).
    - :meth:`published` after an ack went out (a refused publish is tried again next tick).
    """

    __slots__ = (
        "_arrived",
        "_consumed",
        "_every",
        "_gap_end",
        "_pending",
        "_published",
        "_quiet_ticks",
        "_span",
        "_stirred",
    )

    def __init__(self, window_bytes: int) -> None:
        self._every = max(window_bytes // 4, 1)
        self._span = window_bytes // CHUNK_COST_BYTES + 2
        """Frames an agent may have sent beyond its last ack (one over per reader)."""
        self._pending = 0
        self._consumed = -1
        self._arrived = -1
        self._gap_end = -1
        self._published = -1
        self._quiet_ticks = 0
        self._stirred = True
        """Something arrived since the last tick (a new channel counts: its first tick only
        starts the count, its first window may still be on the way)."""

    def arrived(self, seq: int) -> None:
        self._arrived = max(self._arrived, seq)
        self._stirred = True

    def gap(self, to_seq: int) -> None:
        self._gap_end = max(self._gap_end, to_seq)
        self._stirred = True

    def saw(self, event: Event) -> None:
        """:meth:`arrived` or :meth:`gap` for a :class:`ChannelTracker` event (else nothing)."""
        if isinstance(event, Chunk):
            self.arrived(event.seq)
        elif isinstance(event, Gap):
            self.gap(event.to_seq)

    def consumed(self, seq: int, data_bytes: int) -> int | None:
        self._consumed = seq
        self._pending += chunk_cost(data_bytes)
        past_gap = self._published < self._gap_end < seq
        if self._pending >= self._every or past_gap:
            self._pending = 0
            return seq
        return None

    def published(self, seq: int) -> None:
        if seq <= self._consumed:
            self._published = max(self._published, seq)

    def tick(self) -> int | None:
        if self._stirred:
            self._stirred = False
            self._quiet_ticks = 0
        else:
            self._quiet_ticks += 1
        if self._consumed > self._published:
            self._pending = 0
            return self._consumed
        q = self._quiet_ticks
        # 1, 2, 4, 8, 16, 32, then every 32nd: an idle shell costs an ack per half minute
        due = q % 32 == 0 if q > 32 else q > 0 and q & (q - 1) == 0
        if due and self._consumed >= self._arrived:
            return self._consumed + self._span
        return None


async def send_output_ack(
    bus: Bus,
    session_id: str,
    channel_id: str,
    acks: OutputAcks,
    seq: int | None,
) -> None:
    """Publish ``terminal.ack{seq}`` (nothing when ``seq`` is None: no ack is due) and record
    it in ``acks``; a refused publish is left for the next tick to try again."""
    if seq is None:
        return
    try:
        await bus.publish_session_down(
            session_id, TerminalAck(session_id=session_id, channel_id=channel_id, seq=seq)
        )
    except BusError:
        return
    acks.published(seq)


# ---------------------------------------------------------------- cancellation-safe steps
async def _guarded(
    ctx: WorkContext,
    coro: Coroutine[Any, Any, T],
    undo: Callable[[T], Coroutine[Any, Any, Any]],
    *,
    name: str,
) -> T:
    """Await ``coro`` so that a cancellation cannot lose what it acquires: if the caller is
    cancelled meanwhile, ``coro`` still finishes in the background and ``undo`` releases what it
    returned (an audit row left open, a subscription left registered)."""
    task: asyncio.Task[T] = ctx.background.spawn(coro, name=name)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        async def release() -> None:
            try:
                value = await task
            except Exception:
                return  # it failed: nothing to release
            await undo(value)

        ctx.background.spawn(release(), name=f"{name}-undo")
        raise


async def _cleanup(ctx: WorkContext, coro: Coroutine[Any, Any, None], *, name: str) -> None:
    """Run cleanup to its end even if the caller is cancelled meanwhile (it goes on in the
    background; the caller still sees its cancellation)."""
    await asyncio.shield(ctx.background.spawn(coro, name=name))


async def begin_audit_guarded(
    ctx: WorkContext,
    *,
    ref: SessionRef,
    action: AuditAction,
    channel_id: str,
    detail: dict[str, Any],
) -> int:
    """:func:`begin_audit` that a cancellation cannot leave open: a row committed after the
    caller was cancelled is completed with ``cancelled`` (nothing was sent)."""

    async def close_row(audit_id: int) -> None:
        await complete_audit(ctx.sessionmaker, audit_id, reason=ExitReason.CANCELLED.value)

    return await _guarded(
        ctx,
        begin_audit(ctx.sessionmaker, ref=ref, action=action, channel_id=channel_id, detail=detail),
        close_row,
        name=f"audit-{channel_id}",
    )


# ---------------------------------------------------------------- one command
@dataclass
class StartedCommand:
    channel_id: str
    pid: int | None


async def start_command(
    ctx: WorkContext, *, ref: SessionRef, spec: CommandSpec
) -> tuple[CommandRun, StartedCommand]:
    """Audit, subscribe, send ``terminal.command`` and wait for ``terminal.started``.

    Whatever ends this early (a refusal, a bus error, the caller's cancellation at any await)
    completes the audit row and closes the subscription, in shielded cleanup."""
    channel_id = new_id()
    audit_id = await begin_audit_guarded(
        ctx,
        ref=ref,
        action=AuditAction.COMMAND_RUN,
        channel_id=channel_id,
        detail=command_detail(spec),
    )
    return await _send_command(ctx, ref=ref, spec=spec, channel_id=channel_id, audit_id=audit_id)


async def authorize_and_start(
    ctx: WorkContext, *, session_id: str, tech: Technician, spec: CommandSpec
) -> tuple[CommandRun, StartedCommand]:
    """:func:`start_command` whose authorization and audit row are one transaction
    (:func:`authorize_and_audit`, run under ``_guarded``): the exec path."""
    channel_id = new_id()
    tech_id, role = tech.id, tech.role  # plain values before any await

    async def close_row(started: tuple[SessionRef, int]) -> None:
        await complete_audit(ctx.sessionmaker, started[1], reason=ExitReason.CANCELLED.value)

    ref, audit_id = await _guarded(
        ctx,
        authorize_and_audit(
            ctx.sessionmaker,
            session_id=session_id,
            tech_id=tech_id,
            role=role,
            action=AuditAction.COMMAND_RUN,
            channel_id=channel_id,
            detail=command_detail(spec),
        ),
        close_row,
        name=f"audit-{channel_id}",
    )
    return await _send_command(ctx, ref=ref, spec=spec, channel_id=channel_id, audit_id=audit_id)


async def _send_command(
    ctx: WorkContext, *, ref: SessionRef, spec: CommandSpec, channel_id: str, audit_id: int
) -> tuple[CommandRun, StartedCommand]:
    """Subscribe, send ``terminal.command``, wait for ``terminal.started`` (audit row written)."""
    sub: SessionSubscription | None = None
    try:
        sub = await _guarded(
            ctx,
            ctx.bus.subscribe_session(ref.session_id),
            lambda s: s.close(),
            name=f"sub-{channel_id}",
        )
        started_at = time.monotonic()
        reply = await ctx.bus.request_agent(
            ref.agent_id,
            TerminalCommand(
                req_id=new_id(),
                session_id=ref.session_id,
                channel_id=channel_id,
                command=spec.command,
                argv=spec.argv,
                cwd=spec.cwd,
                timeout_s=spec.timeout_s,
                max_output_bytes=spec.max_output_bytes,
                inline_result=True,
                window_bytes=ctx.settings.output_window_bytes,
            ),
            ctx.settings.exec_start_timeout_s,
        )
        answer = reply.frame
        if isinstance(answer, TunnelError):
            raise work_refusal(answer.code, answer.error[:512])
        if not isinstance(answer, TerminalStarted) or answer.channel_id != channel_id:
            raise AgentFailed(f"unexpected answer from the agent ({answer.type})")
    except BaseException as exc:
        code = getattr(exc, "code", None)
        if isinstance(code, ErrorCode):
            reason = code.value
        elif isinstance(exc, asyncio.CancelledError):
            reason = ExitReason.CANCELLED.value
        else:
            reason = "not_started"
        # it may have started after all (a late answer): make sure it does not run on; an
        # offline agent or a failed subscription means nothing reached it
        tell = sub is not None and not (
            isinstance(exc, BusError) and exc.code == ErrorCode.AGENT_OFFLINE
        )
        await _cleanup(
            ctx,
            _undo_start(ctx, ref, channel_id, sub, audit_id, reason=reason, tell_agent=tell),
            name=f"undo-{channel_id}",
        )
        raise
    run = CommandRun(
        ctx,
        ref=ref,
        channel_id=channel_id,
        audit_id=audit_id,
        sub=sub,
        timeout_s=spec.timeout_s,
        started_at=started_at,
        first_frames=answer.frames(),
        window_bytes=answer.window_bytes,
    )
    return run, StartedCommand(channel_id=channel_id, pid=answer.pid)


async def _undo_start(
    ctx: WorkContext,
    ref: SessionRef,
    channel_id: str,
    sub: SessionSubscription | None,
    audit_id: int,
    *,
    reason: str,
    tell_agent: bool,
) -> None:
    try:
        if tell_agent:
            with contextlib.suppress(BusError):
                await ctx.bus.publish_session_down(
                    ref.session_id, TerminalCancel(session_id=ref.session_id, channel_id=channel_id)
                )
        if sub is not None:
            await sub.close()
    finally:
        await complete_audit(ctx.sessionmaker, audit_id, reason=reason)
        ctx.metrics.command_finished(reason)


class CommandRun:
    """The events of one started command (see the module contract).

    Its end (exit frame, loss, or abandonment) is handled exactly once, by one background task
    (``_ending``) awaited through ``asyncio.shield``: a cancelled reader never leaves the audit
    row open or the subscription registered."""

    def __init__(
        self,
        ctx: WorkContext,
        *,
        ref: SessionRef,
        channel_id: str,
        audit_id: int,
        sub: SessionSubscription,
        timeout_s: float,
        started_at: float,
        first_frames: list[TerminalChunk | TerminalExit] | None = None,
        window_bytes: int | None = None,
    ) -> None:
        self.ctx = ctx
        self._first_frames = first_frames or []
        """Frames the agent's answer carried: read before the subscription's."""
        self.ref = ref
        self.channel_id = channel_id
        self.audit_id = audit_id
        self.sub = sub
        self.tracker = ChannelTracker(channel_id)
        self.acks = OutputAcks(window_bytes) if window_bytes is not None else None
        """Output flow control, when the agent echoed the window (see the module contract)."""
        self.deadline = started_at + timeout_s + ctx.settings.exec_grace_s
        self.started_at = started_at
        self.dropped = 0
        self.api_truncated = False
        self.session_close_reason: str | None = None
        """Why the session closed, when the command ended because it did (``max_duration``,
        ``idle_timeout``, ``closed_by_user`` ...): the technician's result and stream carry it."""
        self._ending: asyncio.Task[None] | None = None

    @property
    def finished(self) -> bool:
        """Its end is handled (or being handled): no more abandonment needed."""
        return self._ending is not None

    def _end(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        if self._ending is None:
            self._ending = self.ctx.background.spawn(coro, name=f"end-{self.channel_id}")
        else:
            coro.close()
        return self._ending

    def abandon(self) -> None:
        """The reader went away before the end: cancel on the agent, record the exit later.
        Idempotent; a no-op once the run ended."""
        self._end(self._drain_after_cancel())

    async def events(self) -> AsyncGenerator[Event, None]:
        """Chunks and gaps in order, ending with the exit frame or ``Lost``."""
        if self.finished:
            yield Lost(ErrorCode.INTERNAL_ERROR, "the command was abandoned before it was read")
            return
        try:
            async for event in self._events():
                acks = self.acks
                if acks is not None:
                    acks.saw(event)
                yield event
                if acks is not None and isinstance(event, Chunk):
                    # the reader asked for the next event: it consumed this one
                    await self._ack(acks.consumed(event.seq, len(event.data)))
        finally:
            self.abandon()

    async def _ack(self, seq: int | None) -> None:
        if self.acks is not None and not self.finished:
            await send_output_ack(
                self.ctx.bus, self.ref.session_id, self.channel_id, self.acks, seq
            )

    async def _events(self) -> AsyncIterator[Event]:
        s = self.ctx.settings
        closed_deadline: float | None = None
        next_watch = time.monotonic() + s.session_watch_interval_s
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                yield await self._lost(
                    ErrorCode.AGENT_TIMEOUT,
                    "no exit frame from the agent within timeout_s + grace"
                    + (f" ({self.dropped} frames dropped by the bus)" if self.dropped else ""),
                )
                return
            if closed_deadline is not None and now >= closed_deadline:
                yield await self._lost(
                    ErrorCode.SESSION_CLOSED,
                    "the session closed and no exit frame came from the agent",
                )
                return
            if now >= next_watch:
                next_watch = now + s.session_watch_interval_s
                if self.acks is not None:
                    await self._ack(self.acks.tick())
                if closed_deadline is None and not await self._session_active():
                    closed_deadline = now + s.exec_close_grace_s
                continue
            frame: Frame
            if self._first_frames:
                frame = self._first_frames.pop(0)
            else:
                wake = min(self.deadline, next_watch, closed_deadline or self.deadline)
                try:
                    item = await self.sub.next(wake - now)
                except BusError:
                    # the subscription ended with the NATS connection: only the bounds end this
                    await asyncio.sleep(max(0.0, min(wake - time.monotonic(), 0.5)))
                    continue
                if item is None:
                    continue
                if isinstance(item, FramesDropped):
                    self.dropped += item.count
                    continue
                frame = item.frame
            if isinstance(frame, TunnelClosed):
                if closed_deadline is None:
                    closed_deadline = time.monotonic() + s.exec_close_grace_s
                continue
            if not isinstance(frame, TerminalChunk | TerminalExit):
                continue
            if frame.channel_id != self.channel_id:
                continue
            for event in self.tracker.accept(frame):
                if isinstance(event, TerminalExit):
                    await asyncio.shield(self._end(self._complete(event)))
                    if event.reason == ExitReason.SESSION_CLOSED:
                        await self._learn_close_reason()
                    yield event
                    return
                yield event

    async def _read_state(self) -> tuple[bool, tuple[str, str | None] | None]:
        """(the database answered, (state, close_reason) or None when no such session)."""
        try:
            found = await asyncio.wait_for(
                session_state(self.ctx.sessionmaker, self.ref.session_id),
                self.ctx.settings.request_timeout_s,
            )
        except Exception as exc:
            log.info("session state not read", extra={"error": type(exc).__name__})
            return False, None
        return True, found

    async def _learn_close_reason(self) -> None:
        """Read why the session closed (the close is committed before the agent is told)."""
        _, found = await self._read_state()
        if found is not None and found[0] != SessionState.ACTIVE.value:
            self.session_close_reason = found[1]

    async def _session_active(self) -> bool:
        answered, found = await self._read_state()
        # the database does not answer: the command's own deadline still bounds the wait
        return not answered or (found is not None and found[0] == SessionState.ACTIVE.value)

    async def _complete(self, exit_frame: TerminalExit) -> None:
        try:
            await complete_audit(
                self.ctx.sessionmaker,
                self.audit_id,
                reason=exit_frame.reason.value,
                exit_frame=exit_frame,
                truncated=exit_frame.truncated or self.api_truncated,
            )
            self.ctx.metrics.command_finished(exit_frame.reason.value)
        finally:
            await self.sub.close()

    async def _lost(self, code: ErrorCode, message: str) -> Lost:
        await asyncio.shield(self._end(self._cleanup_lost(code)))
        if code == ErrorCode.SESSION_CLOSED:
            await self._learn_close_reason()
        return Lost(code, message)

    async def _cleanup_lost(self, code: ErrorCode) -> None:
        try:
            with contextlib.suppress(BusError):
                await self.ctx.bus.publish_session_down(
                    self.ref.session_id,
                    TerminalCancel(session_id=self.ref.session_id, channel_id=self.channel_id),
                )
            await self.sub.close()
        finally:
            await complete_audit(self.ctx.sessionmaker, self.audit_id, reason=code.value)
            self.ctx.metrics.command_finished(code.value)

    async def _drain_after_cancel(self) -> None:
        try:
            # an exit the agent's answer carried, unread: no cancel, nothing to wait for
            exit_frame = next((f for f in self._first_frames if isinstance(f, TerminalExit)), None)
            if exit_frame is None:
                exit_frame = await self._cancel_and_wait_for_exit()
            reason = exit_frame.reason.value if exit_frame is not None else "client_gone"
            await complete_audit(
                self.ctx.sessionmaker, self.audit_id, reason=reason, exit_frame=exit_frame
            )
            self.ctx.metrics.command_finished(reason)
        finally:
            await self.sub.close()

    async def _cancel_and_wait_for_exit(self) -> TerminalExit | None:
        """Publish ``terminal.cancel``; the exit frame within ``exec_close_grace_s``, or None."""
        with contextlib.suppress(BusError):
            await self.ctx.bus.publish_session_down(
                self.ref.session_id,
                TerminalCancel(session_id=self.ref.session_id, channel_id=self.channel_id),
            )
        deadline = time.monotonic() + self.ctx.settings.exec_close_grace_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = await self.sub.next(left)
            except BusError:
                return None
            if item is None or isinstance(item, FramesDropped):
                continue
            frame = item.frame
            if isinstance(frame, TerminalExit) and frame.channel_id == self.channel_id:
                return frame
        return None


async def collect(run: CommandRun, *, encoding: Encoding) -> ExecResult:
    """The full result of ``run``; 504 ``agent_timeout`` when no exit frame came."""
    cap = run.ctx.settings.max_result_bytes
    out, err = bytearray(), bytearray()
    async for event in run.events():
        if isinstance(event, Chunk):
            room = cap - len(out) - len(err)
            if len(event.data) > room:
                run.api_truncated = True
            target = out if event.stream == OutputStream.STDOUT else err
            target += event.data[: max(room, 0)]
        elif isinstance(event, TerminalExit):
            return _result(run, out, err, encoding, event)
        elif isinstance(event, Lost):
            if event.code == ErrorCode.SESSION_CLOSED:
                return _result(run, out, err, encoding, None, error=event.message)
            raise GatewayTimeout(event.message)
    raise GatewayTimeout("the command's output ended without an exit frame")


def _text(data: bytearray, encoding: Encoding) -> str:
    if encoding == "base64":
        return base64.b64encode(bytes(data)).decode("ascii")
    return bytes(data).decode("utf-8", errors="replace")


def _result(
    run: CommandRun,
    out: bytearray,
    err: bytearray,
    encoding: Encoding,
    exit_frame: TerminalExit | None,
    error: str | None = None,
) -> ExecResult:
    gaps = [GapPublic(from_seq=g.from_seq, to_seq=g.to_seq) for g in run.tracker.gaps]
    if exit_frame is None:
        return ExecResult(
            channel_id=run.channel_id,
            stdout=_text(out, encoding),
            stderr=_text(err, encoding),
            encoding=encoding,
            exit_code=None,
            reason=ExitReason.SESSION_CLOSED,
            truncated=run.api_truncated,
            duration_s=round(time.monotonic() - run.started_at, 3),
            stdout_bytes=len(out),
            stderr_bytes=len(err),
            gaps=gaps,
            error=error,
            session_close_reason=run.session_close_reason,
        )
    return ExecResult(
        channel_id=run.channel_id,
        stdout=_text(out, encoding),
        stderr=_text(err, encoding),
        encoding=encoding,
        exit_code=exit_frame.exit_code,
        reason=exit_frame.reason,
        truncated=exit_frame.truncated or run.api_truncated,
        duration_s=exit_frame.duration_s,
        stdout_bytes=exit_frame.stdout_bytes,
        stderr_bytes=exit_frame.stderr_bytes,
        gaps=gaps,
        error=exit_frame.error,
        session_close_reason=run.session_close_reason,
    )
