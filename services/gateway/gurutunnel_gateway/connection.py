"""One authenticated agent socket: one reader loop, a writer that lives while frames are queued.

Contract (docs/design.md "Agent socket" and "Bus"):
- ``run`` subscribes the agent's command subject and, once that subscription is flushed,
  registers the connection in the hub (so a current connection always has a responder) and calls
  ``admitted`` (the gateway's last checks: revocation, drain). Then it sends ``welcome``,
  publishes ``presence.connected`` (JetStream, retried in the background a bounded number of
  times), and reads frames until the socket ends. On the way out it unsubscribes everything of
  this connection, answers every pending request with ``CommandFailed{agent_offline}`` and
  publishes ``presence.disconnected`` with a ``DisconnectReason`` and the close code.
- Every command gets an answer: a closing connection (revoked, draining, errored, replaced)
  answers ``CommandFailed{agent_offline}`` unless a newer connection of the same agent on this
  replica is current and subscribed (it answers instead); a request the agent leaves
  unanswered past ``command_timeout_s`` is answered ``CommandFailed{agent_timeout}`` by the
  sweep; a gateway bug while handling a command answers ``CommandFailed{internal_error}``.
- Takeover across gateways (docs/design.md "Takeover across gateways"): once
  ``presence.connected`` is acknowledged, its stream sequence is ``connected_seq`` and a
  ``ConnectionTakeover`` notice carrying it goes to ``gateway.control`` (not sent by a
  connection that already knows it lost). ``on_takeover`` with a higher sequence than ours
  (or any sequence, when our ``presence.connected`` was lost) *supersedes* the connection: it
  closes ``REPLACED`` and from then on answers nothing, neither new requests nor the ones it
  held (they are dropped: the newer connection subscribed the command subject before its
  notice existed, so it answers every request published since). A notice that arrives before
  our own sequence is known is kept and compared once it is. A lower sequence is ignored.
- A request is answered only by a frame type that fits it (``REPLIES_BY_REQUEST``); any other
  answer gets an ``error`` frame and the request stays pending.
- Every frame to the agent goes through a queue of ``send_queue_frames``; overflow closes the
  socket with ``CloseCode.BACKPRESSURE`` (a request that could not be queued is also answered
  ``CommandFailed{agent_backpressure}``). The queue and its writer task exist only while frames
  wait: an idle connection holds neither (memory per idle agent). A command is written by the
  task that handles it when nothing waits and the socket's buffer is empty (``send_now``: no
  writer task per command); frames sent meanwhile queue behind it, so order is kept.
- Agent control frames (heartbeats, answers, errors) are rate limited per connection (token
  bucket: ``max_frames_per_s``, burst ``frame_burst``); one over the limit is dropped and
  answered ``error{rate_limited}``. Every frame also spends ``max_read_bytes_per_s`` byte tokens
  (burst ``read_burst_bytes``); over that budget the gateway reads more slowly, pushing back on
  the agent's TCP stream: session data (output, file chunks) is shaped, never dropped.
- Bad agent frames (undecodable, binary, naming a session this connection does not hold, over
  the rate limit) get an ``error`` frame and the loop goes on; ``max_consecutive_errors`` in a
  row close with ``CloseCode.TOO_MANY_ERRORS``. A gateway bug while handling a frame is logged
  (exception type and place, never the payload), answered ``error{internal_error}`` and counted
  the same way; the loop goes on.
- Identity (``agent_id``) comes from the credential; every publication is stamped with it and
  with ``conn_id``, ``gateway_id`` and ``boot_id``.
- Frames are validated once and forwarded as received: an agent frame goes into its
  ``SessionUp`` / ``CommandReply`` as the JSON text the gateway validated
  (``envelope.spliced_head``, as ``encode_spliced`` joins them; the receiver decodes the same
  text with the same models), a
  command or session input from the API goes to the agent as the bytes it validated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gurutunnel_protocol import CloseCode, ErrorCode, ProtocolError, Subjects, new_id
from gurutunnel_protocol.envelope import (
    decode_agent_command,
    decode_agent_to_server,
    encode,
    encode_text,
    spliced_head,
)
from gurutunnel_protocol.messages import (
    REPLIES_BY_REQUEST,
    REPLY_TYPES,
    REQUEST_TYPES,
    SESSION_DOWN_TYPES,
    SESSION_UP_TYPES,
    AgentConnected,
    AgentDisconnected,
    AgentHeartbeat,
    AgentReply,
    AgentToServer,
    CommandFailed,
    CommandReply,
    ConnectionTakeover,
    DisconnectReason,
    ErrorFrame,
    FileAck,
    FileChunk,
    Frame,
    Heartbeat,
    SessionUp,
    TerminalChunk,
    TunnelClose,
    TunnelClosed,
    TunnelData,
    TunnelReady,
    Welcome,
)

from .auth import AgentIdentity
from .bus import Bus, BusError, BusSubscription
from .config import GatewaySettings
from .metrics import GatewayMetrics

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger(__name__)

# Session data: limited by the byte budget (shaped), not by the control-frame rate (dropped).
DATA_TYPES = (TunnelData, TerminalChunk, FileChunk, FileAck)

PING_TIMEOUT_REASON = "keepalive ping timeout"  # websockets' close reason on a missed pong


@dataclass(frozen=True, slots=True)
class ConnectionDeps:
    """What every connection of one gateway shares."""

    settings: GatewaySettings
    subjects: Subjects
    bus: Bus
    hub: Hub
    gateway_id: str
    boot_id: str
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)


@dataclass(slots=True)
class PendingRequest:
    """A request forwarded to the agent, waiting for the frame with the same ``req_id``."""

    reply: str
    deadline: float
    kind: str
    session_id: str | None


@dataclass(slots=True)
class HeldSession:
    """A session bound to this connection (the agent answered ``tunnel.ready``)."""

    session_id: str
    subscription: BusSubscription
    seq: int = 0


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; one token per frame."""

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(
        self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def take(self) -> bool:
        """Spend one token if there is one; False means over the limit."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def reserve(self, tokens: float) -> float:
        """Spend ``tokens`` now, going into debt if needed; the seconds until the debt is paid."""
        self._refill()
        self._tokens -= tokens
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


_DIRECT_WRITE_MAX_BYTES = 8 * 1024
"""Largest frame ``send_now`` writes itself: well under the transport's high-water mark
(websockets' 32 KiB by default), so the write never waits for the agent to read."""


def _where(exc: BaseException) -> str:
    """Where ``exc`` was raised (file:line in function), without its message (may hold data)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown place"
    last = frames[-1]
    return f"{last.filename}:{last.lineno} in {last.name}"


def _text(payload: bytes, frame: Frame) -> str:
    """``payload`` (the JSON ``frame`` was validated from) as text; re-encoded if not UTF-8."""
    try:
        return payload.decode()
    except UnicodeDecodeError:
        return encode_text(frame)


@dataclass(slots=True)
class _CloseRequest:
    code: int
    reason: DisconnectReason
    text: str
    final: Frame | None = None
    task: asyncio.Task[None] | None = field(default=None)


def _now() -> datetime:
    return datetime.now(UTC)


class AgentConnection:
    """The gateway side of one agent WebSocket."""

    def __init__(
        self,
        ws: ServerConnection,
        identity: AgentIdentity,
        deps: ConnectionDeps,
        *,
        remote_addr: str | None = None,
    ) -> None:
        self.ws = ws
        self.identity = identity
        self.agent_id = identity.agent_id
        self.conn_id = new_id()
        self._deps = deps
        self._settings = deps.settings
        self._remote_addr = remote_addr
        self._queue: deque[str] | None = None
        """Frames waiting for the writer (at most ``send_queue_frames``); None while none wait:
        an idle agent holds neither a queue nor a writer task."""
        self._writer: asyncio.Task[None] | None = None
        self._writing_now = False
        """A frame is being written by ``send_now`` (later frames queue behind it)."""
        self._announcing: asyncio.Task[None] | None = None
        """Publishes ``presence.connected`` (``_announce``); None once done."""
        self._pending: dict[str, PendingRequest] = {}
        self._sessions: dict[str, HeldSession] = {}
        self._cmd_sub: BusSubscription | None = None
        self._close: _CloseRequest | None = None
        self._ended = False
        self._errors = 0
        self._rate = TokenBucket(deps.settings.max_frames_per_s, deps.settings.frame_burst)
        self._read_bytes = TokenBucket(
            deps.settings.max_read_bytes_per_s, deps.settings.read_burst_bytes
        )
        self.connected_seq: int | None = None
        """Stream sequence of this connection's ``presence.connected`` (None until acked)."""
        self.superseded = False
        """A newer connection of this agent (here or on another gateway) took over."""
        self._presence_lost = False
        self._newest_notice_seq = 0
        """Highest sequence another connection announced before ours was known."""
        self._frame_json: tuple[Frame, str] | None = None
        """The frame being handled and the agent's text it was validated from."""
        self._stamp_head: tuple[type[Frame], bytes] | None = None
        """An envelope without per-frame fields and its head (``_head``), built at first use."""

    # ------------------------------------------------------------------ helpers

    def _extra(self, session_id: str | None = None, **more: Any) -> dict[str, Any]:
        extra: dict[str, Any] = {"agent_id": self.agent_id, "conn_id": self.conn_id, **more}
        if session_id is not None:
            extra["session_id"] = session_id
        return extra

    def _stamp(self) -> dict[str, str]:
        return {
            "agent_id": self.agent_id,
            "gateway_id": self._deps.gateway_id,
            "boot_id": self._deps.boot_id,
            "conn_id": self.conn_id,
        }

    @property
    def boot_id(self) -> str:
        """The gateway boot this connection was accepted under (stamped on its events)."""
        return self._deps.boot_id

    @property
    def closing(self) -> bool:
        return self._close is not None or self._ended

    @property
    def accepts_commands(self) -> bool:
        """Subscribed to the agent's command subject and not closing: it answers commands."""
        return self._cmd_sub is not None and not self.closing

    @property
    def sessions(self) -> frozenset[str]:
        return frozenset(self._sessions)

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def send(self, frame: Frame, *, as_received: bytes | None = None) -> bool:
        """Queue a frame for the agent; on overflow close with BACKPRESSURE and return False.

        ``as_received``: the JSON that ``frame`` was decoded from (a command from the API),
        sent as it is rather than encoded again."""
        if self.closing:
            return False
        text = encode_text(frame) if as_received is None else _text(as_received, frame)
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        elif len(queue) >= self._settings.send_queue_frames:
            log.warning("send queue overflow", extra=self._extra())
            self.close(CloseCode.BACKPRESSURE, DisconnectReason.CLOSED, "send queue overflow")
            return False
        queue.append(text)
        if not self._writing_now:
            self._start_writer()
        return True

    def _start_writer(self) -> None:
        """A writer for the queued frames, unless one runs; it lives only while frames wait
        (an idle agent holds no task for it)."""
        queue = self._queue
        if queue and self._writer is None and not self._ended:
            self._writer = asyncio.create_task(self._write(queue), name=f"writer-{self.conn_id}")

    async def send_now(self, frame: Frame, *, as_received: bytes | None = None) -> bool:
        """``send``, but written by the caller when nothing waits before it, the socket's buffer
        is empty and the frame is small (so the write does not wait for the agent): a command
        costs no writer task. Otherwise queued as by ``send``. Order is kept: frames sent
        meanwhile queue."""
        transport = self.ws.transport
        if (
            self._writer is not None
            or self._queue is not None
            or self._writing_now
            or self.closing
            or transport is None
            or transport.get_write_buffer_size()
            or len(as_received or b"") > _DIRECT_WRITE_MAX_BYTES
        ):
            return self.send(frame, as_received=as_received)
        text = encode_text(frame) if as_received is None else _text(as_received, frame)
        self._writing_now = True
        try:
            with contextlib.suppress(ConnectionClosed):
                await self._write_one(text)
        finally:
            self._writing_now = False
            self._start_writer()  # for what was queued meanwhile
        return True

    def close(
        self,
        code: int,
        reason: DisconnectReason,
        text: str = "",
        *,
        final: Frame | None = None,
    ) -> None:
        """Close the socket with ``code`` (first call wins), optionally sending ``final`` first."""
        if self.closing:
            return
        request = _CloseRequest(code=code, reason=reason, text=text[:120], final=final)
        self._close = request
        request.task = asyncio.create_task(self._close_socket(request))

    async def _close_socket(self, request: _CloseRequest) -> None:
        if request.final is not None:
            # Sent directly, past a possibly full queue: it is the last word to the agent.
            text = encode_text(request.final)
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await asyncio.wait_for(self.ws.send(text), self._settings.close_timeout_s)
                self._deps.metrics.traffic.frames_out += 1
                self._deps.metrics.traffic.bytes_out += len(text)
        # Bounded by the server's close_timeout: websockets aborts the TCP connection after it.
        await self.ws.close(request.code, request.text)

    async def _reply(self, reply: str, message: Frame) -> None:
        await self._reply_bytes(reply, encode(message))

    async def _reply_bytes(self, reply: str, payload: bytes) -> None:
        try:
            await self._deps.bus.publish(reply, payload)
        except BusError as exc:
            log.warning("reply not published: %s", exc, extra=self._extra())

    async def _fail(self, reply: str, code: ErrorCode, message: str) -> None:
        failed = CommandFailed(
            agent_id=self.agent_id,
            gateway_id=self._deps.gateway_id,
            code=code,
            message=message[:1024],
        )
        await self._reply(reply, failed)

    def _refuse(self, code: ErrorCode, message: str, req_id: str | None = None) -> None:
        """Answer a bad agent frame with an error frame; too many in a row close the socket."""
        self._errors += 1
        self.send(ErrorFrame(code=code, message=message[:1024], req_id=req_id))
        if self._errors >= self._settings.max_consecutive_errors:
            log.warning("too many consecutive bad frames", extra=self._extra())
            self.close(CloseCode.TOO_MANY_ERRORS, DisconnectReason.CLOSED, "too many errors")

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self,
        *,
        admitted: Callable[[AgentConnection], None] | None = None,
        set_up: Callable[[], None] | None = None,
    ) -> None:
        """Serve the socket until it ends; always publishes the disconnect on the way out.

        ``admitted`` is called right after the hub registration (it may close the connection),
        ``set_up`` once ``presence.connected`` is acknowledged by the stream (or given up),
        the end of the connection's set-up (the welcome is queued before).
        """
        try:
            await self._set_up(admitted, set_up)
            await self._read()
        finally:
            await self._finish()

    async def _set_up(
        self,
        admitted: Callable[[AgentConnection], None] | None,
        set_up: Callable[[], None] | None,
    ) -> None:
        """Subscribe, register, welcome, announce (see ``run``). A method of its own: what it
        builds (the presence event, ...) is not kept alive by ``run``'s frame for the life of
        the connection."""
        try:
            # Subscribe before the welcome: once the agent is told it is connected, a
            # request on its command subject must find a responder.
            self._cmd_sub = await self._deps.bus.subscribe(
                self._deps.subjects.agent_commands(self.agent_id), self._on_command
            )
        except BusError as exc:
            log.error("command subscription failed: %s", exc, extra=self._extra())
            self.close(CloseCode.INTERNAL_ERROR, DisconnectReason.CLOSED, "bus unavailable")
        else:
            # Current only once the subscription is flushed: while the hub names this
            # connection current, a command on the agent's subject finds a responder here.
            self._deps.hub.register(self)
            if admitted is not None:
                admitted(self)
        self.send(
            Welcome(
                agent_id=self.agent_id,
                conn_id=self.conn_id,
                gateway_id=self._deps.gateway_id,
                heartbeat_interval_s=self._settings.agent_heartbeat_interval_s,
            )
        )
        event = AgentConnected(
            **self._stamp(), event_id=new_id(), at=_now(), remote_addr=self._remote_addr
        )
        announcing = asyncio.create_task(self._announce(event, published=set_up))
        self._announcing = announcing
        announcing.add_done_callback(self._announced)
        log.info("agent connected", extra=self._extra())

    def _announced(self, task: asyncio.Task[None]) -> None:
        if self._announcing is task:
            self._announcing = None  # a finished task is not kept for the connection's life
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                "presence.connected not announced: %s at %s",
                type(exc).__name__,
                _where(exc),
                extra=self._extra(),
            )

    async def _read(self) -> None:
        traffic = self._deps.metrics.traffic
        # recv() rather than ``async for``: no async generator kept per connection
        try:
            while True:
                message = await self.ws.recv()
                traffic.frames_in += 1
                traffic.bytes_in += len(message)
                if self.closing:
                    continue  # closing (revoked, replaced, ...): nothing more is acted upon
                # Bytes are shaped, never dropped: reading later pushes back on the agent's TCP
                # stream, so bulk output slows down instead of losing frames.
                delay = self._read_bytes.reserve(len(message))
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    await self._on_message(message)
                except ProtocolError as exc:
                    self._refuse(exc.code, exc.message)
                except Exception as exc:
                    # Last resort: a gateway bug on one frame must not end the agent's socket
                    # (and its session). Logged without the frame: it may carry technician data.
                    log.error(
                        "agent frame could not be handled: %s at %s",
                        type(exc).__name__,
                        _where(exc),
                        extra=self._extra(),
                    )
                    self._refuse(
                        ErrorCode.INTERNAL_ERROR, "the gateway could not handle this frame"
                    )
        except ConnectionClosed:
            return  # the socket ended, cleanly or not: _finish tells which

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            raise ProtocolError(
                ErrorCode.MALFORMED_FRAME, "binary frames are not supported by this gateway"
            )
        frame = decode_agent_to_server(message, self._settings.max_frame_bytes)
        if not isinstance(frame, DATA_TYPES) and not self._rate.take():
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"more than {self._settings.max_frames_per_s:g} control frames/s; frame dropped",
            )
        self._frame_json = (frame, message)
        try:
            await self._on_agent_frame(frame)
        finally:
            self._frame_json = None

    def _enveloped(self, envelope: type[Frame], frame: Frame, **fields: str | int) -> bytes:
        """``envelope`` (stamped) around ``frame``: the agent's validated JSON spliced in when
        ``frame`` is the frame being handled (no re-encoding), else ``frame`` encoded."""
        handled = self._frame_json
        if handled is None or handled[0] is not frame:
            return encode(envelope(**self._stamp(), **fields, frame=frame))
        return b"".join((self._head(envelope, fields), handled[1].encode(), b"}"))

    def _head(self, envelope: type[Frame], fields: dict[str, str | int]) -> bytes:
        """``envelope``'s JSON up to its frame (``spliced_head``). Without per-frame fields it
        is the same for every frame of this connection (the stamp is constant) and is built
        once: json.dumps of the stamp was the largest part of the gateway's own work per
        command reply."""
        if fields:
            return spliced_head(envelope, {**self._stamp(), **fields})
        cached = self._stamp_head
        if cached is None or cached[0] is not envelope:
            cached = self._stamp_head = (envelope, spliced_head(envelope, self._stamp()))
        return cached[1]

    async def _write_one(self, text: str) -> None:
        """Write one frame to the socket and count it (the writer's and ``send_now``'s way)."""
        await self.ws.send(text)
        traffic = self._deps.metrics.traffic
        traffic.frames_out += 1
        traffic.bytes_out += len(text)

    async def _write(self, queue: deque[str]) -> None:
        """Send what is queued, in order, then end (``send`` starts the next writer)."""
        try:
            with contextlib.suppress(ConnectionClosed):
                while queue:
                    await self._write_one(queue.popleft())
        finally:
            # No await between the empty queue and this: a send() after it starts a new writer
            # (and a new queue: an idle connection keeps none).
            self._writer = None
            if not queue and self._queue is queue:
                self._queue = None

    async def _finish(self) -> None:
        self._ended = True
        self._deps.hub.unregister(self)
        writer = self._writer
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        if self._cmd_sub is not None:
            await self._cmd_sub.unsubscribe()
        for held in list(self._sessions.values()):
            await held.subscription.unsubscribe()
        self._sessions.clear()
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            await self._fail(entry.reply, ErrorCode.AGENT_OFFLINE, "agent connection ended")
        code, reason = self._outcome()
        log.info("agent disconnected", extra=self._extra(reason=reason.value, close_code=code))
        self._deps.metrics.connection_closed(code, reason.value)
        if self._close is not None and self._close.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._close.task, self._settings.close_timeout_s)
        connected = self._announcing
        if connected is not None:
            # connected must reach the stream before disconnected (both retries are bounded);
            # a failure of its own is logged by _announced
            with contextlib.suppress(Exception):
                await connected
        event = AgentDisconnected(
            **self._stamp(), event_id=new_id(), at=_now(), reason=reason, close_code=code
        )
        await self._publish_presence(event)

    def _outcome(self) -> tuple[int | None, DisconnectReason]:
        if self._close is not None:
            return self._close.code, self._close.reason
        sent = self.ws.protocol.close_sent
        if sent is not None and sent.reason == PING_TIMEOUT_REASON:
            return int(sent.code), DisconnectReason.PING_TIMEOUT
        if sent is not None and self.ws.protocol.close_rcvd is None:
            return int(sent.code), DisconnectReason.CLOSED  # e.g. 1009 frame too large
        return self.ws.close_code, DisconnectReason.CLOSED

    async def _publish_presence(self, event: AgentConnected | AgentDisconnected) -> int | None:
        """JetStream publish with de-duplication; a bounded number of attempts.

        Returns the event's stream sequence, or None when every attempt failed."""
        subject = self._deps.subjects.presence(self.agent_id)
        payload = encode(event)
        for attempt in range(1, self._settings.presence_attempts + 1):
            try:
                return await self._deps.bus.publish_durable(
                    subject,
                    payload,
                    msg_id=event.event_id,
                    timeout_s=self._settings.publish_timeout_s,
                )
            except BusError as exc:
                log.warning(
                    "presence publish failed (attempt %d): %s",
                    attempt,
                    exc,
                    extra=self._extra(event=event.type),
                )
                if attempt < self._settings.presence_attempts:
                    await asyncio.sleep(self._settings.presence_retry_wait_s * attempt)
        log.error("presence event lost after retries", extra=self._extra(event=event.type))
        return None

    # ------------------------------------------------------------------ takeover

    async def _announce(
        self, event: AgentConnected, *, published: Callable[[], None] | None = None
    ) -> None:
        """Publish ``presence.connected``, learn its sequence, then claim the agent.

        ``published`` is called once the publish is acknowledged or given up."""
        try:
            seq = await self._publish_presence(event)
        finally:
            if published is not None:
                published()
        if seq is None:
            # Without a sequence this connection cannot be ordered: any connection that has one
            # wins (a notice seen meanwhile, or one arriving later, supersedes it).
            self._presence_lost = True
            if self._newest_notice_seq:
                self._supersede()
            return
        self.connected_seq = seq
        if self._newest_notice_seq > seq:
            self._supersede()
        if self.superseded:
            return
        # Sent even while closing (replaced on this replica, draining): a connection with a
        # higher sequence than the local replacement must still fence the older ones elsewhere,
        # so that every gateway agrees with the API, which orders connections the same way.
        notice = ConnectionTakeover(**self._stamp(), connected_seq=seq, at=_now())
        try:
            await self._deps.bus.publish(self._deps.subjects.gateway_control(), encode(notice))
        except BusError as exc:
            # Core NATS, best effort: the API still fences sessions by connected_seq, and the
            # older socket still ends by its own ping timeout.
            log.warning("takeover notice not published: %s", exc, extra=self._extra())

    def on_takeover(self, notice: ConnectionTakeover) -> bool:
        """Another connection of this agent announced its sequence; True if it superseded us."""
        if notice.agent_id != self.agent_id or notice.conn_id == self.conn_id:
            return False
        if self.connected_seq is None and not self._presence_lost:
            # our own sequence is not known yet: _announce compares once it is
            self._newest_notice_seq = max(self._newest_notice_seq, notice.connected_seq)
            return False
        if self.connected_seq is not None and notice.connected_seq <= self.connected_seq:
            log.info(
                "takeover notice of an older connection ignored (seq %d, ours %d)",
                notice.connected_seq,
                self.connected_seq,
                extra=self._extra(),
            )
            return False
        self._supersede()
        return True

    def _supersede(self) -> None:
        """A newer connection owns the agent: close ``REPLACED`` and never answer again."""
        if self.superseded:
            return
        self.superseded = True
        # Dropped, not answered: the newer connection subscribed the command subject before it
        # announced itself, so it got (and answers) every request published since; answering
        # agent_offline here would race its real answer (NATS takes the first reply).
        dropped, self._pending = len(self._pending), {}
        log.info(
            "superseded by a newer connection; %d held requests dropped",
            dropped,
            extra=self._extra(),
        )
        self.close(CloseCode.REPLACED, DisconnectReason.REPLACED, "replaced by a newer connection")

    async def expire_pending(self, now: float) -> int:
        """Answer ``agent_timeout`` to requests past their deadline; return how many."""
        expired = [
            (req_id, entry) for req_id, entry in self._pending.items() if entry.deadline <= now
        ]
        for req_id, _ in expired:
            del self._pending[req_id]  # first: a late answer of the agent is now refused
        for req_id, entry in expired:
            log.info(
                "request timed out",
                extra=self._extra(entry.session_id, frame_type=entry.kind, req_id=req_id),
            )
            await self._fail(
                entry.reply,
                ErrorCode.AGENT_TIMEOUT,
                f"agent did not answer {entry.kind} within {self._settings.command_timeout_s:g}s",
            )
        return len(expired)

    # ------------------------------------------------------------------ bus -> agent

    async def _on_command(self, payload: bytes, reply: str | None) -> None:
        if reply is None:
            log.warning("command without a reply subject dropped", extra=self._extra())
            return
        try:
            await self._forward_command(payload, reply)
        except Exception as exc:
            # Last resort: the API must get an answer now, not wait out its timeout.
            log.error(
                "command could not be handled: %s at %s",
                type(exc).__name__,
                _where(exc),
                extra=self._extra(),
            )
            await self._fail(
                reply, ErrorCode.INTERNAL_ERROR, "the gateway could not handle this command"
            )

    def _newer_answers(self) -> bool:
        """Another connection of this agent answers commands: the current one of this replica,
        or, when that one was superseded, the newer connection elsewhere."""
        current = self._deps.hub.current(self.agent_id)
        return (
            current is not None
            and current is not self
            and (current.accepts_commands or current.superseded)
        )

    async def _forward_command(self, payload: bytes, reply: str) -> None:
        if self.superseded:
            return  # the newer connection (subscribed before it announced itself) answers
        if self.closing or not self._deps.hub.is_current(self):
            if self._newer_answers():
                return  # both are subscribed: the current one answers, a second reply is noise
            await self._fail(reply, ErrorCode.AGENT_OFFLINE, "agent connection is closing")
            return
        try:
            frame = decode_agent_command(payload, self._settings.max_frame_bytes)
        except ProtocolError as exc:
            await self._fail(reply, ErrorCode.MALFORMED_FRAME, exc.message)
            return
        if not isinstance(frame, REQUEST_TYPES) or frame.req_id is None:
            await self._fail(
                reply,
                ErrorCode.MALFORMED_FRAME,
                f"{frame.type} is not a request with a req_id (expected one of: "
                "tunnel.open, tunnel.close, channel.open, channel.close, terminal.command)",
            )
            return
        if frame.req_id in self._pending:
            await self._fail(reply, ErrorCode.MALFORMED_FRAME, "req_id already in flight")
            return
        if len(self._pending) >= self._settings.max_pending_requests:
            await self._fail(reply, ErrorCode.AGENT_BACKPRESSURE, "too many requests in flight")
            return
        self._pending[frame.req_id] = PendingRequest(
            reply=reply,
            deadline=time.monotonic() + self._settings.command_timeout_s,
            kind=frame.type,
            session_id=frame.session_id,
        )
        if not await self.send_now(frame, as_received=payload):
            self._pending.pop(frame.req_id, None)
            await self._fail(reply, ErrorCode.AGENT_BACKPRESSURE, "agent send queue is full")

    async def _on_down(self, session_id: str, payload: bytes, reply: str | None) -> None:
        if self.closing or session_id not in self._sessions:
            return
        try:
            frame = decode_agent_command(payload, self._settings.max_frame_bytes)
        except ProtocolError as exc:
            log.warning("bad session frame: %s", exc.message, extra=self._extra(session_id))
            if reply is not None:
                await self._fail(reply, exc.code, exc.message)
            return
        if not isinstance(frame, SESSION_DOWN_TYPES) or frame.session_id != session_id:
            log.warning(
                "session frame refused", extra=self._extra(session_id, frame_type=frame.type)
            )
            if reply is not None:
                await self._fail(
                    reply, ErrorCode.MALFORMED_FRAME, f"{frame.type} not allowed on this subject"
                )
            return
        self.send(frame, as_received=payload)

    # ------------------------------------------------------------------ agent -> bus

    async def _on_agent_frame(self, frame: AgentToServer) -> None:
        if isinstance(frame, Heartbeat):
            await self._on_heartbeat(frame)
            self._errors = 0
            return
        req_id: str | None = getattr(frame, "req_id", None)
        session_id: str | None = getattr(frame, "session_id", None)
        pending = self._pending.get(req_id) if req_id is not None else None
        if req_id is not None and pending is not None and isinstance(frame, REPLY_TYPES):
            if not isinstance(frame, REPLIES_BY_REQUEST.get(pending.kind, ())):
                self._refuse(
                    ErrorCode.MALFORMED_FRAME,
                    f"{frame.type} does not answer a {pending.kind} request",
                    req_id=req_id,
                )
                return
            if pending.session_id and session_id and session_id != pending.session_id:
                self._refuse(
                    ErrorCode.NOT_YOUR_SESSION, "answer names another session", req_id=req_id
                )
                return
            self._errors = 0
            del self._pending[req_id]
            await self._answer(pending, frame)
            return
        if session_id is None:
            self._refuse(
                ErrorCode.MALFORMED_FRAME,
                f"{frame.type} answers no pending request and names no session",
                req_id=req_id,
            )
            return
        held = self._sessions.get(session_id)
        if held is None:
            self._refuse(
                ErrorCode.NOT_YOUR_SESSION,
                "this connection holds no such session",
                req_id=req_id,
            )
            return
        if not isinstance(frame, SESSION_UP_TYPES):
            self._refuse(ErrorCode.MALFORMED_FRAME, f"unexpected {frame.type}", req_id=req_id)
            return
        self._errors = 0
        seq = held.seq
        held.seq += 1  # consumed even if the publish fails: the receiver sees the gap
        up = self._enveloped(SessionUp, frame, session_id=session_id, seq=seq)
        try:
            await self._deps.bus.publish(self._deps.subjects.session_up(session_id), up)
        except BusError as exc:
            log.warning("session frame not published: %s", exc, extra=self._extra(session_id))
        if isinstance(frame, TunnelClosed):
            await self._release(session_id)

    async def _answer(self, pending: PendingRequest, frame: AgentReply) -> None:
        # the frame fits pending.kind (REPLIES_BY_REQUEST): tunnel.ready answers tunnel.open
        if isinstance(frame, TunnelReady) and not await self._bind(frame.session_id):
            await self._fail(pending.reply, ErrorCode.BUS_UNAVAILABLE, "session not bound")
            self.send(TunnelClose(session_id=frame.session_id, reason="gateway_error"))
            return
        await self._reply_bytes(pending.reply, self._enveloped(CommandReply, frame))
        if isinstance(frame, TunnelClosed):
            await self._release(frame.session_id)

    async def _bind(self, session_id: str) -> bool:
        """Hold ``session_id``: subscribe its down subject before the API learns it is ready."""
        if session_id in self._sessions:
            return True

        async def on_down(payload: bytes, reply: str | None) -> None:
            await self._on_down(session_id, payload, reply)

        try:
            sub = await self._deps.bus.subscribe(
                self._deps.subjects.session_down(session_id), on_down
            )
        except BusError as exc:
            log.error("session subscription failed: %s", exc, extra=self._extra(session_id))
            return False
        self._sessions[session_id] = HeldSession(session_id=session_id, subscription=sub)
        log.info("session bound", extra=self._extra(session_id))
        return True

    async def _release(self, session_id: str) -> None:
        held = self._sessions.pop(session_id, None)
        if held is not None:
            await held.subscription.unsubscribe()
            log.info("session released", extra=self._extra(session_id))

    async def _on_heartbeat(self, frame: Heartbeat) -> None:
        session_id = frame.session_id
        if session_id is not None and session_id not in self._sessions:
            # Liveness is still published, without the session the agent cannot claim.
            self.send(
                ErrorFrame(
                    code=ErrorCode.NOT_YOUR_SESSION,
                    message="heartbeat names a session this connection does not hold",
                )
            )
            session_id = None
        beat = AgentHeartbeat(
            **self._stamp(),
            at=_now(),
            mode=frame.mode,
            session_id=session_id,
            metrics=frame.metrics,
        )
        try:
            await self._deps.bus.publish(
                self._deps.subjects.agent_events(self.agent_id, "heartbeat"), encode(beat)
            )
        except BusError as exc:
            log.warning("heartbeat not published: %s", exc, extra=self._extra())
