"""One technician WebSocket of a session: several commands and shells at once.

Contract (messages in :mod:`.schemas`):
- The socket subscribes to ``session.<id>.up`` once, before it sends any request, and routes
  each ``terminal.chunk``/``terminal.exit`` to its channel by ``channel_id`` (a jump in ``seq``
  is a ``gap`` message; frames of channels this socket did not start are ignored). Frames that
  arrive before the agent's answer to the request are held (at most ``_EARLY_FRAMES`` chunks
  per channel, or what one output window holds if more; later chunks are dropped and show as
  a gap; the exit frame is always kept) and sent after ``started``.
- Outgoing messages go through ONE bounded queue (``ws_send_queue_max`` messages and
  ``ws_send_queue_max_bytes``, whichever comes first; one message larger than the byte bound
  still passes alone) drained by one writer task, each send bounded by ``ws_send_timeout_s``.
  A technician who stops reading fills it and the socket is closed with 1013 ("try again
  later": the server dropped a client that could not keep up) instead of growing memory: at
  the overflow the queued messages are dropped, the channels are handed over at once (as
  below) and the socket is closed; only that close may still wait, at most
  ``ws_send_timeout_s``, on the stuck transport. A reader thus sees
  every chunk in ``seq`` order, gaps, and then 1013: never bytes lost silently. ``chunk``
  messages are built as text directly (:func:`chunk_text`, the model's exact text): they are
  the per-output-chunk cost of a stream.
- Output flow control: commands and shells are started with ``window_bytes =
  output_window_bytes``; when the agent's answer echoes it, a chunk counts as consumed once the
  writer has sent it to the technician (:class:`.service.OutputAcks` says when to publish
  ``terminal.ack``, and what each watch tick acknowledges again). A technician who reads
  slowly thus slows the agent's output instead of filling this queue.
- Bad client messages get ``error{code: validation_error}`` and the loop goes on. Running more
  than ``ws_max_channels`` channels gets ``error{too_many_channels}`` (a slot is reserved by the
  reader before any await, so a burst cannot pass the limit).
- The technician is re-checked (role admin or tech, not disabled, owner unless admin) before
  each exec/shell and on every watch tick; one no longer allowed has the socket closed with
  4401 (running channels are then cancelled as below).
- Activity (exec, shell open, cancel: always; input and resize: at most every
  ``activity_write_interval_s``) is written to ``tech_session.last_activity_at``; ping is not.
- Every ``session_watch_interval_s`` the socket checks its session: once it is no longer active
  (or a ``tunnel.closed`` frame arrives), running channels get ``exec_close_grace_s`` for their
  exit frames (``error{session_closed}`` for the rest), then ``session.closed{reason}`` is sent
  and the socket closes with 1000. The same check ends commands past
  ``timeout_s + exec_grace_s`` with ``error{agent_timeout}`` and ``terminal.cancel`` on the
  agent.
- When the socket ends, running commands are cancelled and shells closed on the agent; their
  exit frames are still awaited (at most ``exec_close_grace_s``) to complete the audit rows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import WebSocket
from pydantic import BaseModel, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from gurutunnel_protocol import ErrorCode, new_id
from gurutunnel_protocol.messages import (
    CHUNK_COST_BYTES,
    ChannelClose,
    ChannelOpened,
    OutputStream,
    ShellOpen,
    ShellResize,
    TerminalCancel,
    TerminalChunk,
    TerminalExit,
    TerminalStarted,
    TunnelClosed,
    TunnelData,
    TunnelError,
)
from gurutunnel_protocol.messages import Terminal as TerminalCommand

from ..audit.models import AuditAction
from ..bus import BusError, FramesDropped, SessionSubscription
from ..errors import AgentFailed, ApiError, bus_error_to_api, work_refusal
from ..sessions.models import SessionState
from . import service
from .schemas import (
    WsCancelIn,
    WsErrorOut,
    WsExecIn,
    WsExitOut,
    WsGapOut,
    WsInputIn,
    WsPingIn,
    WsPongOut,
    WsResizeIn,
    WsSessionClosedOut,
    WsShellIn,
    WsStartedOut,
    ws_client_message,
    ws_text,
)
from .service import ChannelTracker, Chunk, Gap, OutputAcks, SessionRef, WorkContext

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_TICKET_REFUSED = 4401
CLOSE_SESSION_NOT_ACTIVE = 4409
_EARLY_FRAMES = 1024
NOT_ALLOWED = "technician no longer allowed in this session"


@dataclass
class _Channel:
    channel_id: str
    kind: Literal["exec", "shell"]
    audit_id: int | None
    deadline: float | None
    started_at: float
    client_id: str | None
    tracker: ChannelTracker
    started: bool = False
    acks: OutputAcks | None = None
    """Output flow control, once the agent's answer echoed the window."""
    early: list[TerminalChunk | TerminalExit] = field(default_factory=list)


@dataclass(slots=True)
class _Chunk:
    """A queued ``chunk`` message: acknowledged to the agent once sent."""

    text: str
    channel_id: str
    seq: int
    data_bytes: int


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class TechSocket:
    """See the module contract."""

    def __init__(self, websocket: WebSocket, ctx: WorkContext, ref: SessionRef) -> None:
        self.ws = websocket
        self.ctx = ctx
        self.s = ctx.settings
        self.ref = ref
        self.queue: asyncio.Queue[str | _Chunk | _Close] = asyncio.Queue(
            maxsize=self.s.ws_send_queue_max
        )
        self.channels: dict[str, _Channel] = {}
        self.closing = False
        self.overflowed = False
        self._queued_chars = 0
        """Characters of the messages in ``queue`` (JSON text: bytes in practice)."""
        self._last_activity_write = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed_reason: str | None = None
        self._close_deadline: float | None = None
        self._sub: SessionSubscription | None = None
        self._reserved = 0
        """Channels accepted by the reader whose ``_open`` has not registered them yet."""
        self._close_requested = False
        self._early_max = max(_EARLY_FRAMES, self.s.output_window_bytes // CHUNK_COST_BYTES + 2)
        """Chunks held per channel before its answer: at least a window's worth (the agent
        cannot send more before an ack, and none comes before the answer)."""
        self._overflow = asyncio.Event()
        """Set when the queue overflowed: ``run`` ends the socket at once (see ``send``)."""

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        try:
            self._sub = await self.ctx.bus.subscribe_session(self.ref.session_id)
        except BusError:
            await self._close_now(1011, "message bus unavailable")
            return
        loops = [
            asyncio.create_task(self._writer(), name="ws-writer"),
            asyncio.create_task(self._reader(), name="ws-reader"),
            asyncio.create_task(self._dispatcher(self._sub), name="ws-dispatch"),
            asyncio.create_task(self._watcher(), name="ws-watch"),
            # the writer may be stuck in a send to a reader who stopped reading: an overflow
            # ends the socket now, not after ws_send_timeout_s of buffering frames meanwhile
            asyncio.create_task(self._overflow.wait(), name="ws-overflow"),
        ]
        try:
            await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._hand_over(self._sub)
            if self.ws.application_state == WebSocketState.CONNECTED:
                code = CLOSE_TRY_AGAIN_LATER if self.overflowed else CLOSE_NORMAL
                await self._close_now(code, "send queue overflow" if self.overflowed else "")

    async def _close_now(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason), self.s.ws_send_timeout_s)

    def send(self, message: BaseModel) -> None:
        """Queue a message; a full queue drops the socket (1013), never the bus."""
        if self.overflowed:
            return
        self._put(ws_text(message))

    def _put(self, item: str | _Chunk) -> None:
        """Queue one message (its text, or a chunk with its text; see ``send``)."""
        size = len(item) if isinstance(item, str) else len(item.text)
        # bounded in bytes too: a thousand 32 KiB output chunks would be ~45 MB per socket
        too_big = self._queued_chars and (
            self._queued_chars + size > self.s.ws_send_queue_max_bytes
        )
        try:
            if too_big:
                raise asyncio.QueueFull
            self.queue.put_nowait(item)
            self._queued_chars += size
        except asyncio.QueueFull:
            self._overflowed()

    def _overflowed(self) -> None:
        """The reader fell too far behind: drop what is queued (the socket closes with 1013,
        so nothing is lost silently) and end the socket at once."""
        self.overflowed = True
        log.warning(
            "technician websocket not reading; closing it",
            extra={"session_id": self.ref.session_id},
        )
        while not self.queue.empty():
            self.queue.get_nowait()
        self._queued_chars = 0
        self.queue.put_nowait(_Close(CLOSE_TRY_AGAIN_LATER, "send queue overflow"))
        self._overflow.set()

    async def _writer(self) -> None:
        send = self.ws.send
        timeout_s = self.s.ws_send_timeout_s
        while True:
            item = await self.queue.get()
            if isinstance(item, _Close):
                if item.code == CLOSE_TRY_AGAIN_LATER:
                    self.overflowed = True
                    return  # run() closes with 1013 without waiting on the stuck transport
                await self._close_now(item.code, item.reason)
                return
            text = item if isinstance(item, str) else item.text
            self._queued_chars -= len(text)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for runs each send in a new task
                async with asyncio.timeout(timeout_s):
                    await send({"type": "websocket.send", "text": text})
            except TimeoutError:
                self.overflowed = True  # the technician does not read: 1013
                return
            except Exception:
                return  # the socket is gone
            if isinstance(item, _Chunk):
                channel = self.channels.get(item.channel_id)
                if channel is not None and channel.acks is not None:
                    await self._ack(channel, channel.acks.consumed(item.seq, item.data_bytes))

    # ------------------------------------------------------------ client -> server
    async def _reader(self) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                self.send(WsErrorOut(code="validation_error", message="send JSON text frames"))
                continue
            try:
                msg = ws_client_message.validate_json(raw)
            except ValidationError as exc:
                self.send(WsErrorOut(code="validation_error", message=_first_error(exc)))
                continue
            if self.closing:
                if not isinstance(msg, WsPingIn):
                    self.send(WsErrorOut(code="session_closed", message="the session is closing"))
                continue
            if isinstance(msg, WsPingIn):
                self.send(WsPongOut())
            elif isinstance(msg, WsExecIn | WsShellIn):
                if len(self.channels) + self._reserved >= self.s.ws_max_channels:
                    self.send(
                        WsErrorOut(
                            id=msg.id,
                            code=ErrorCode.TOO_MANY_CHANNELS.value,
                            message="this socket runs as many channels as allowed",
                        )
                    )
                    continue
                # the slot is taken now, before any await: a burst cannot pass the limit
                self._reserved += 1
                self._spawn(self._open(msg))
            elif isinstance(msg, WsInputIn):
                await self._to_shell(
                    msg.channel_id,
                    TunnelData(
                        session_id=self.ref.session_id, channel_id=msg.channel_id, data=msg.data
                    ),
                )
            elif isinstance(msg, WsResizeIn):
                await self._to_shell(
                    msg.channel_id,
                    ShellResize(
                        session_id=self.ref.session_id,
                        channel_id=msg.channel_id,
                        cols=msg.cols,
                        rows=msg.rows,
                    ),
                )
            elif isinstance(msg, WsCancelIn):
                await self._cancel(msg.channel_id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _activity(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_activity_write < self.s.activity_write_interval_s:
            return
        self._last_activity_write = now
        try:
            await service.record_activity(self.ctx.sessionmaker, self.ref.session_id)
        except Exception as exc:
            log.info("activity not recorded", extra={"error": type(exc).__name__})

    async def _to_shell(self, channel_id: str, frame: TunnelData | ShellResize) -> None:
        channel = self.channels.get(channel_id)
        if channel is None or channel.kind != "shell" or not channel.started:
            self.send(WsErrorOut(channel_id=channel_id, code="not_found", message="no such shell"))
            return
        await self._publish(channel_id, frame)
        await self._activity(force=False)

    async def _cancel(self, channel_id: str) -> None:
        channel = self.channels.get(channel_id)
        if channel is None:
            self.send(
                WsErrorOut(channel_id=channel_id, code="not_found", message="no such channel")
            )
            return
        frame: TerminalCancel | ChannelClose = (
            ChannelClose(session_id=self.ref.session_id, channel_id=channel_id)
            if channel.kind == "shell"
            else TerminalCancel(session_id=self.ref.session_id, channel_id=channel_id)
        )
        await self._publish(channel_id, frame)
        await self._activity(force=True)

    async def _publish(
        self, channel_id: str, frame: TunnelData | ShellResize | TerminalCancel | ChannelClose
    ) -> None:
        try:
            await self.ctx.bus.publish_session_down(self.ref.session_id, frame)
        except BusError as exc:
            self.send(WsErrorOut(channel_id=channel_id, code=exc.code.value, message=str(exc)))

    async def _ack(self, channel: _Channel, seq: int | None) -> None:
        if channel.acks is not None:
            await service.send_output_ack(
                self.ctx.bus, self.ref.session_id, channel.channel_id, channel.acks, seq
            )

    async def _open(self, msg: WsExecIn | WsShellIn) -> None:
        """Audit, register the channel, send the request, announce ``started`` (or ``error``).
        The reader reserved a slot (``_reserved``); it is released when the channel is
        registered or the open fails."""
        channel_id = new_id()
        kind: Literal["exec", "shell"] = "exec" if isinstance(msg, WsExecIn) else "shell"
        registered = False
        try:
            if not await self._may_act():
                self._close_with(CLOSE_TICKET_REFUSED, NOT_ALLOWED)
                return
            try:
                audit_id = await service.begin_audit_guarded(
                    self.ctx,
                    ref=self.ref,
                    action=AuditAction.COMMAND_RUN if kind == "exec" else AuditAction.SHELL_OPEN,
                    channel_id=channel_id,
                    detail=service.command_detail(msg)
                    if isinstance(msg, WsExecIn)
                    else {"cols": msg.cols, "rows": msg.rows},
                )
            except ApiError as exc:
                self.send(WsErrorOut(id=msg.id, code=exc.code.value, message=exc.message))
                return
            now = time.monotonic()
            channel = _Channel(
                channel_id=channel_id,
                kind=kind,
                audit_id=audit_id,
                deadline=now + msg.timeout_s + self.s.exec_grace_s
                if isinstance(msg, WsExecIn)
                else None,
                started_at=now,
                client_id=msg.id,
                tracker=ChannelTracker(channel_id),
            )
            # before the request: no early frame is lost; from here a socket that ends hands
            # the channel over (cancel on the agent, audit completed)
            self.channels[channel_id] = channel
            self._reserved -= 1
            registered = True
        finally:
            if not registered:
                self._reserved -= 1
        request = (
            TerminalCommand(
                req_id=new_id(),
                session_id=self.ref.session_id,
                channel_id=channel_id,
                command=msg.command,
                argv=msg.argv,
                cwd=msg.cwd,
                timeout_s=msg.timeout_s,
                max_output_bytes=msg.max_output_bytes,
                inline_result=True,
                window_bytes=self.s.output_window_bytes,
            )
            if isinstance(msg, WsExecIn)
            else ShellOpen(
                req_id=new_id(),
                session_id=self.ref.session_id,
                channel_id=channel_id,
                cols=msg.cols,
                rows=msg.rows,
                window_bytes=self.s.output_window_bytes,
            )
        )
        pid: int | None = None
        window: int | None = None
        first: list[TerminalChunk | TerminalExit] = []
        try:
            try:
                reply = await self.ctx.bus.request_agent(
                    self.ref.agent_id, request, self.s.exec_start_timeout_s
                )
            except BusError as exc:
                raise bus_error_to_api(exc) from None
            answer = reply.frame
            if isinstance(answer, TunnelError):
                raise work_refusal(answer.code, answer.error[:512])
            if isinstance(answer, TerminalStarted) and answer.channel_id == channel_id:
                pid, first, window = answer.pid, answer.frames(), answer.window_bytes
            elif isinstance(answer, ChannelOpened) and answer.channel_id == channel_id:
                window = answer.window_bytes
            else:
                raise AgentFailed(f"unexpected answer from the agent ({answer.type})")
        except ApiError as exc:
            self.channels.pop(channel_id, None)
            self.send(WsErrorOut(id=msg.id, code=exc.code.value, message=exc.message))
            # in the background: a socket ending now must not leave the row open; a late
            # start (no answer in time) is stopped on the agent
            self.ctx.background.spawn(
                self._end_refused(channel, exc.code),
                name=f"audit-{channel_id}",
            )
            return
        self._started(channel, pid, first, window)

    def _started(
        self,
        channel: _Channel,
        pid: int | None,
        first: list[TerminalChunk | TerminalExit],
        window: int | None = None,
    ) -> None:
        """Announce ``started``, then the frames the answer carried (``first``), then those
        held until now (in arrival order). ``window``: the output window the agent echoed."""
        channel.started = True
        if window is not None:
            channel.acks = OutputAcks(window)
        self.send(
            WsStartedOut(
                id=channel.client_id, channel_id=channel.channel_id, kind=channel.kind, pid=pid
            )
        )
        early, channel.early = [*first, *channel.early], []
        for frame in early:
            self._route(channel, frame)

    async def _end_audit(
        self, channel: _Channel, *, reason: str, exit_frame: TerminalExit | None
    ) -> None:
        if channel.kind == "exec":
            if channel.audit_id is not None:
                await service.complete_audit(
                    self.ctx.sessionmaker, channel.audit_id, reason=reason, exit_frame=exit_frame
                )
                self.ctx.metrics.command_finished(reason)
        else:
            await service.record_shell_close(
                self.ctx.sessionmaker,
                ref=self.ref,
                channel_id=channel.channel_id,
                reason=reason,
                exit_frame=exit_frame,
            )

    # ------------------------------------------------------------ agent -> client
    async def _dispatcher(self, sub: SessionSubscription) -> None:
        while True:
            try:
                item = await sub.next(None)
            except BusError:
                # the bus connection closed under us: the watcher's bounds end the channels
                await asyncio.sleep(self.s.session_watch_interval_s)
                continue
            if item is None or isinstance(item, FramesDropped):
                continue  # the channels' seq shows exactly what was lost
            frame = item.frame
            if isinstance(frame, TunnelClosed):
                self._begin_closing("agent_closed")
                continue
            if not isinstance(frame, TerminalChunk | TerminalExit):
                continue
            channel = self.channels.get(frame.channel_id)
            if channel is None:
                continue
            if not channel.started:
                # an exit frame is always kept; chunks beyond the bound are dropped and show as
                # a gap (their seq is missing)
                if isinstance(frame, TerminalExit) or len(channel.early) < self._early_max:
                    channel.early.append(frame)
                continue
            self._route(channel, frame)

    def _route(self, channel: _Channel, frame: TerminalChunk | TerminalExit) -> None:
        for event in channel.tracker.accept(frame):
            if channel.acks is not None:
                channel.acks.saw(event)
            if isinstance(event, Chunk):
                if not self.overflowed:
                    self._put(
                        _Chunk(
                            chunk_text(channel.channel_id, event.seq, event.stream, event.data),
                            channel.channel_id,
                            event.seq,
                            len(event.data),
                        )
                    )
            elif isinstance(event, Gap):
                self.send(
                    WsGapOut(
                        channel_id=channel.channel_id,
                        from_seq=event.from_seq,
                        to_seq=event.to_seq,
                    )
                )
            elif isinstance(event, TerminalExit):
                self.send(
                    WsExitOut(
                        channel_id=channel.channel_id,
                        seq=event.seq,
                        reason=event.reason,
                        exit_code=event.exit_code,
                        truncated=event.truncated,
                        duration_s=event.duration_s,
                        stdout_bytes=event.stdout_bytes,
                        stderr_bytes=event.stderr_bytes,
                        error=event.error,
                    )
                )
                self.channels.pop(channel.channel_id, None)
                self.ctx.background.spawn(
                    self._end_audit(channel, reason=event.reason.value, exit_frame=event),
                    name=f"audit-{channel.channel_id}",
                )

    # ------------------------------------------------------------ bounds and session end
    def _begin_closing(self, reason: str) -> None:
        if self._close_deadline is None:
            self.closing = True
            self._closed_reason = reason
            self._close_deadline = time.monotonic() + self.s.exec_close_grace_s

    async def _watcher(self) -> None:
        while True:
            await asyncio.sleep(
                min(self.s.session_watch_interval_s, 0.1)
                if self._close_deadline is not None
                else self.s.session_watch_interval_s
            )
            now = time.monotonic()
            for channel in list(self.channels.values()):
                if channel.deadline is not None and now >= channel.deadline:
                    self._lose(channel, ErrorCode.AGENT_TIMEOUT, "no exit frame within timeout")
                elif channel.acks is not None:
                    await self._ack(channel, channel.acks.tick())
            if self._close_deadline is None:
                if not await self._may_act():
                    self._close_with(CLOSE_TICKET_REFUSED, NOT_ALLOWED)
                    return
                state = await self._session_state()
                if state is not None and state[0] != SessionState.ACTIVE.value:
                    self._begin_closing(state[1] or state[0])
                continue
            if self.channels and now < self._close_deadline:
                continue  # running channels still get their exit frames
            for channel in list(self.channels.values()):
                self._lose(channel, ErrorCode.SESSION_CLOSED, "the session closed")
            state = await self._session_state()
            reason = (state[1] if state and state[1] else None) or self._closed_reason or "closed"
            self.send(WsSessionClosedOut(reason=reason))
            if not self.overflowed:
                self.queue.put_nowait(_Close(CLOSE_NORMAL, "session closed"))
            return

    def _lose(self, channel: _Channel, code: ErrorCode, message: str) -> None:
        """No exit frame within its bound: tell the client, stop it on the agent (like
        ``CommandRun``), complete the audit."""
        self.channels.pop(channel.channel_id, None)
        self.send(WsErrorOut(channel_id=channel.channel_id, code=code.value, message=message))
        self.ctx.background.spawn(
            self._stop_lost(channel, code), name=f"audit-{channel.channel_id}"
        )

    async def _end_refused(self, channel: _Channel, code: ErrorCode) -> None:
        if code in (ErrorCode.AGENT_OFFLINE, ErrorCode.CWD_NOT_ALLOWED, ErrorCode.INVALID_COMMAND):
            await self._end_audit(channel, reason=code.value, exit_frame=None)
        else:
            await self._stop_lost(channel, code)

    async def _stop_lost(self, channel: _Channel, code: ErrorCode) -> None:
        try:
            with contextlib.suppress(BusError):
                await self.ctx.bus.publish_session_down(
                    self.ref.session_id, self._stop_frame(channel)
                )
        finally:
            await self._end_audit(channel, reason=code.value, exit_frame=None)

    def _stop_frame(self, channel: _Channel) -> TerminalCancel | ChannelClose:
        if channel.kind == "shell":
            return ChannelClose(session_id=self.ref.session_id, channel_id=channel.channel_id)
        return TerminalCancel(session_id=self.ref.session_id, channel_id=channel.channel_id)

    async def _may_act(self) -> bool:
        """The technician still may act here (role, disabled, ownership); a database that does
        not answer is not a reason to close (the next tick checks again)."""
        try:
            return await asyncio.wait_for(
                service.may_still_act(
                    self.ctx.sessionmaker,
                    session_id=self.ref.session_id,
                    tech_id=self.ref.tech_id,
                ),
                self.s.request_timeout_s,
            )
        except Exception as exc:
            log.info("technician check failed", extra={"error": type(exc).__name__})
            return True

    def _close_with(self, code: int, reason: str) -> None:
        """Close the socket with ``code`` after what is queued (the oldest message makes room
        when the queue is full)."""
        if self._close_requested or self.overflowed:
            return
        self._close_requested = True
        self.closing = True
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(_Close(code, reason))

    async def _session_state(self) -> tuple[str, str | None] | None:
        try:
            return await asyncio.wait_for(
                service.session_state(self.ctx.sessionmaker, self.ref.session_id),
                self.s.request_timeout_s,
            )
        except Exception as exc:
            log.info("session check failed", extra={"error": type(exc).__name__})
            return (SessionState.ACTIVE.value, None)

    def _hand_over(self, sub: SessionSubscription | None) -> None:
        """The socket ended: cancel what still runs and record the exits in the background."""
        running = list(self.channels.values())
        self.channels.clear()
        if sub is None:
            return
        self.ctx.background.spawn(self._drain(sub, running), name=f"ws-drain-{self.ref.session_id}")

    async def _drain(self, sub: SessionSubscription, running: list[_Channel]) -> None:
        try:
            left = {c.channel_id: c for c in running}
            for channel in running:
                with contextlib.suppress(BusError):
                    await self.ctx.bus.publish_session_down(
                        self.ref.session_id, self._stop_frame(channel)
                    )
            deadline = time.monotonic() + self.s.exec_close_grace_s
            while left and (wait := deadline - time.monotonic()) > 0:
                try:
                    item = await sub.next(wait)
                except BusError:
                    break
                if item is None or isinstance(item, FramesDropped):
                    continue
                exit_frame = item.frame
                if isinstance(exit_frame, TerminalExit) and exit_frame.channel_id in left:
                    channel = left.pop(exit_frame.channel_id)
                    await self._end_audit(
                        channel, reason=exit_frame.reason.value, exit_frame=exit_frame
                    )
            for channel in left.values():
                await self._end_audit(channel, reason="client_gone", exit_frame=None)
        finally:
            await sub.close()


def chunk_text(channel_id: str, seq: int, stream: OutputStream, data: bytes) -> str:
    """``ws_text(WsChunkOut(...))`` without building the model: the one message of a stream,
    so its cost is per output chunk (the same text; a test holds them equal). ``channel_id``
    is an id this API made (``new_id``: hex) and ``stream`` an enum value: neither needs JSON
    escaping."""
    return (
        f'{{"type":"chunk","channel_id":"{channel_id}","seq":{seq},'
        f'"stream":"{stream.value}","data":"{base64.b64encode(data).decode("ascii")}"}}'
    )


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid message"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "message"
    return f"{where}: {first.get('msg', 'invalid')}"[:512]
