"""The API's side of the bus: the only module that imports ``nats``.

Contract:
- :class:`Bus` is the interface the services use (an in-memory fake can stand in for it in unit
  tests); :class:`NatsBus` is the real adapter with one long-lived connection.
- ``request_agent(agent_id, frame, timeout_s) -> CommandReply`` sends one ``AgentCommand`` on
  ``agent.<id>.cmd`` and raises only the domain errors below, never a NATS exception::

    BusError
     +-- AgentOffline     no gateway holds the agent (NATS "no responders")
     +-- AgentTimeout     nobody answered within timeout_s
     +-- BusUnavailable   NATS is disconnected or JetStream does not answer
     +-- AgentRefused     a CommandFailed reply (or a reply that breaks the protocol): .code

- ``send_best_effort`` fires a request in a tracked background task and swallows its failure
  (used for ``tunnel.close``: the database state never depends on the agent).
- ``publish_revocation`` writes ``agent_id -> ISO-8601 not_before`` into the KV bucket
  ``Subjects.revocation_bucket`` (created when missing).
- Every ``BusError`` carries ``.code`` (an ``ErrorCode``): the one key of the failure table in
  :mod:`.errors`.
- ``subscribe_session(session_id)`` subscribes to ``session.<id>.up`` (call it BEFORE
  sending the request whose output it must see: the SUB then precedes the request on the
  connection) and returns a
  :class:`SessionSubscription`: an async iterator of ``SessionUp`` frames and
  :class:`FramesDropped` markers, closed with ``close()`` (or ``async with``). It is bounded by
  ``session_sub_pending_msgs`` / ``session_sub_pending_bytes``: when the reader falls behind,
  NATS drops frames (a slow consumer, reported through the error callback) instead of blocking
  the connection, and the iterator yields ``FramesDropped`` at once; the per-channel ``seq``
  of later frames shows exactly which ones. Undecodable frames are logged and skipped.
- ``publish_session_down(session_id, frame)`` publishes technician input (``tunnel.data``,
  ``terminal.cancel``, ``shell.resize``, ``channel.close``) and file transfer data
  (``file.chunk``, ``file.ack``, ``file.cancel``) on ``session.<id>.down``; raises
  ``BusUnavailable`` when NATS is not connected.
- ``start()`` raises only ``BusUnavailable`` (connect, stream, consumer and subscriptions).
- Reconnects: nats-py replays every core subscription (agent events, gateway heartbeats, the
  pull subscription's inbox, session subscriptions) on the new connection; the durable presence
  consumer lives in the (file-backed) stream and survives a server restart. With
  ``nats_max_reconnect_attempts`` -1 (the default; nats-py treats 0 alike) the client
  reconnects forever and ``connected`` is False meanwhile (readiness fails); with N > 0 it
  closes the connection for good after N + 1 failed attempts, and ``gave_up`` is True from then
  on (``/healthz`` fails, so the process is restarted).
- Consumers: presence events come from the durable pull consumer ``Subjects.presence_consumer``
  on the stream ``Subjects.presence_stream`` (created idempotently with the parameters of
  ``subjects.py``); the handler gets the event and its JetStream stream sequence (the order in
  which the stream received it; no NATS type leaves this module). A message is acked only after
  its handler committed, nak'ed (redelivered after ``presence_nak_delay_s``) when the handler
  failed, and terminated when it cannot be decoded. The consumer is created or updated to the
  settings on every subscribe (a changed ``presence_ack_wait_s`` applies on the next start).
  While a fetched batch is handled, its messages not handled yet are marked in progress every
  ``presence_ack_wait_s / 3``: a slow handler never causes a redelivery, so the ack wait can be
  short, and it alone bounds how long an event fetched by an API that crashed before acking it
  waits to be redelivered to another (or the restarted) API. Agent events and gateway
  heartbeats arrive through core NATS subscriptions in the queue group ``Subjects.api_queue``;
  a failing handler is logged and never stops a subscription.
- Presence consumer health: an idle pull subscription on a deleted consumer or stream only times
  out, so the loop asks for the consumer's info every ``presence_check_interval_s`` while idle.
  "Not found" or ``presence_max_fetch_errors`` consecutive fetch errors mark the consumer down
  (``presence_healthy`` is False, ``/readyz`` answers 503) and the loop recreates stream, durable
  consumer and pull subscription, each attempt bounded by ``request_timeout_s``, retrying with
  exponential backoff from ``presence_resubscribe_backoff_s`` up to
  ``presence_resubscribe_backoff_max_s`` until it succeeds or the bus closes. A recreated
  consumer delivers the stream again from its start; the handlers are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeAlias

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from gurutunnel_protocol import ErrorCode, ProtocolError, Subjects, validate_id
from gurutunnel_protocol.envelope import (
    decode_agent_heartbeat,
    decode_command_result,
    decode_gateway_heartbeat,
    decode_presence,
    decode_session_up,
    encode,
)
from gurutunnel_protocol.messages import (
    AgentHeartbeat,
    ChannelClose,
    ChannelOpen,
    CommandFailed,
    CommandReply,
    FileAck,
    FileCancel,
    FileChunk,
    FileDownload,
    FileUpload,
    GatewayHeartbeat,
    GatewayLeaseLost,
    PresenceEvent,
    SessionUp,
    ShellOpen,
    ShellResize,
    Terminal,
    TerminalAck,
    TerminalCancel,
    TunnelClose,
    TunnelData,
    TunnelOpen,
)
from gurutunnel_protocol.subjects import (
    PRESENCE_STREAM_DUPLICATE_WINDOW_S,
    PRESENCE_STREAM_MAX_AGE_S,
)

from .config import ApiSettings
from .metrics import ApiMetrics

log = logging.getLogger(__name__)


class _Client(NatsClient):
    """nats-py's client with one repair: the PONG of a flush whose future was cancelled.

    A ``flush()`` that is cancelled (its caller's task cancelled, or its own timeout) leaves a
    cancelled future in the client's PONG queue; nats-py 2.16 calls ``set_result`` on it when the
    PONG arrives, the ``InvalidStateError`` ends the read loop, and the client then hears nothing
    (no messages, no replies) until its own pings declare the connection stale. Here such a PONG
    is counted and dropped like any other.
    """

    async def _process_pong(self) -> None:
        if self._pongs and self._pongs[0].done():
            self._pongs.pop(0)
            self._pongs_received += 1
            self._pings_outstanding = 0
            return
        await super()._process_pong()


async def _connect(**options: Any) -> NatsClient:
    """``nats.connect`` with :class:`_Client`."""
    nc = _Client()
    await nc.connect(**options)
    return nc


CommandFrame: TypeAlias = (
    TunnelOpen
    | TunnelClose
    | TunnelData
    | ChannelOpen
    | ChannelClose
    | Terminal
    | ShellOpen
    | FileUpload
    | FileDownload
)
DownFrame: TypeAlias = (
    TunnelData
    | TerminalCancel
    | TerminalAck
    | ShellResize
    | ChannelClose
    | FileChunk
    | FileAck
    | FileCancel
)
"""Frames published on ``session.<id>.down`` (``SESSION_DOWN_TYPES``): technician input, output
acknowledgements and the data side of file transfers."""

# JetStream API error code for "stream name already in use with a different configuration"
_STREAM_EXISTS_DIFFERENT = 10058


class BusError(Exception):
    """Base of every error the bus raises; ``code`` keys the failure table of :mod:`.errors`."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR


class AgentOffline(BusError):
    """No gateway holds the agent (the command was not delivered)."""

    code = ErrorCode.AGENT_OFFLINE


class AgentTimeout(BusError):
    """The agent did not answer in time."""

    code = ErrorCode.AGENT_TIMEOUT


class BusUnavailable(BusError):
    """NATS (or JetStream) cannot be reached."""

    code = ErrorCode.BUS_UNAVAILABLE


class AgentRefused(BusError):
    """The gateway could not deliver the command, or the reply broke the protocol."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class FramesDropped:
    """Marker in a session subscription: NATS dropped frames because the reader fell behind."""

    count: int


class SessionSubscription(Protocol):
    """Frames of one session's up subject, in arrival order (see the module contract)."""

    async def next(self, timeout_s: float | None) -> SessionUp | FramesDropped | None:
        """The next item, or None when ``timeout_s`` passed first; ``BusUnavailable`` once the
        subscription or the connection is closed."""
        ...

    def __aiter__(self) -> AsyncIterator[SessionUp | FramesDropped]: ...

    async def close(self) -> None: ...


class _NatsSessionSubscription:
    """A bounded core-NATS subscription on ``session.<id>.up`` read without a callback.

    One ``next_msg`` task stays pending across timeouts (cancelling it could lose a message
    taken from the queue but not yet returned); it is cancelled only by ``close``.
    """

    def __init__(self, sub: Subscription, session_id: str, on_close: Callable[[], object]) -> None:
        self._sub = sub
        self._on_close = on_close
        self._session_id = session_id
        self._dropped = 0
        self._wake = asyncio.Event()
        self._closed = False
        self._getter: asyncio.Future[Msg] | None = None

    def note_dropped(self) -> None:
        """Called from the error callback for each frame NATS dropped (slow consumer)."""
        self._dropped += 1
        self._wake.set()

    async def next(self, timeout_s: float | None) -> SessionUp | FramesDropped | None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            if self._dropped:
                count, self._dropped = self._dropped, 0
                return FramesDropped(count)
            if self._closed:
                raise BusUnavailable("session subscription closed")
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return None
            if self._getter is None:
                self._getter = asyncio.ensure_future(self._sub.next_msg(timeout=None))
            self._wake.clear()
            waker: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
            waiting: set[asyncio.Future[Any]] = {self._getter, waker}
            try:
                await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
            getter = self._getter
            if getter is None or not getter.done():
                continue
            self._getter = None
            try:
                msg = getter.result()
            except (asyncio.CancelledError, nats.errors.Error):
                self._closed = True
                raise BusUnavailable("session subscription ended") from None
            try:
                up = decode_session_up(msg.data)
            except ProtocolError as exc:
                log.warning(
                    "session frame refused",
                    extra={"session_id": self._session_id, "code": exc.code, "error": exc.message},
                )
                continue
            if up.session_id != self._session_id:
                log.warning(
                    "session frame names another session", extra={"session_id": up.session_id}
                )
                continue
            return up

    def __aiter__(self) -> AsyncIterator[SessionUp | FramesDropped]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[SessionUp | FramesDropped]:
        while True:
            try:
                item = await self.next(None)
            except BusUnavailable:
                return
            if item is not None:
                yield item

    async def close(self) -> None:
        if self._closed and self._getter is None:
            return
        self._closed = True
        self._wake.set()
        self._on_close()
        if self._getter is not None:
            self._getter.cancel()
            with contextlib.suppress(BaseException):
                await self._getter
            self._getter = None
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()

    async def __aenter__(self) -> _NatsSessionSubscription:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


@dataclass(frozen=True, slots=True)
class BusHandlers:
    """What the API does with each kind of inbound event (all must be idempotent)."""

    on_presence: Callable[[PresenceEvent, int], Awaitable[None]]
    """Called with the event and its JetStream stream sequence."""
    on_agent_heartbeat: Callable[[AgentHeartbeat], Awaitable[None]]
    on_gateway_heartbeat: Callable[[GatewayHeartbeat], Awaitable[bool]]
    """True when the lease was renewed; False when the heartbeat's boot was declared lost, and
    the bus then tells that gateway (``GatewayLeaseLost`` on ``gateway.control``)."""


class Bus(Protocol):
    """What the services need from the bus."""

    @property
    def connected(self) -> bool: ...

    async def request_agent(
        self, agent_id: str, frame: CommandFrame, timeout_s: float
    ) -> CommandReply: ...

    def send_best_effort(self, agent_id: str, frame: CommandFrame, timeout_s: float) -> None: ...

    async def publish_revocation(self, agent_id: str, not_before: datetime) -> None: ...

    async def subscribe_session(self, session_id: str) -> SessionSubscription: ...

    async def publish_session_down(self, session_id: str, frame: DownFrame) -> None: ...


class NatsBus:
    """The real bus on one NATS connection."""

    def __init__(
        self, settings: ApiSettings, handlers: BusHandlers, *, metrics: ApiMetrics | None = None
    ) -> None:
        self._settings = settings
        self._handlers = handlers
        self._metrics = metrics or ApiMetrics()
        self.subjects = Subjects(settings.subject_prefix)
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer: asyncio.Task[None] | None = None
        self._psub: JetStreamContext.PullSubscription | None = None
        self._presence_healthy = False
        self._closing = False
        self._session_subs: dict[int, _NatsSessionSubscription] = {}

    # lifecycle

    async def start(self) -> None:
        """Connect, make sure the presence stream exists and start every consumer."""
        s = self._settings
        try:
            self._nc = await asyncio.wait_for(
                _connect(
                    servers=[s.nats_url],
                    name="gurutunnel-api",
                    connect_timeout=s.nats_connect_timeout_s,
                    ping_interval=s.nats_ping_interval_s,
                    max_outstanding_pings=s.nats_max_outstanding_pings,
                    reconnect_time_wait=s.nats_reconnect_wait_s,
                    max_reconnect_attempts=s.nats_max_reconnect_attempts,
                    allow_reconnect=True,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                ),
                timeout=s.nats_connect_timeout_s * 3,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise BusUnavailable(f"cannot connect to NATS: {type(exc).__name__}") from exc
        self._js = self._nc.jetstream(timeout=s.request_timeout_s)
        psub = await self._subscribe_presence()
        try:
            await self._nc.subscribe(
                self.subjects.all_agent_events(),
                queue=self.subjects.api_queue,
                cb=self._on_agent_event,
            )
            await self._nc.subscribe(
                self.subjects.gateway_heartbeat(),
                queue=self.subjects.api_queue,
                cb=self._on_gateway_heartbeat,
            )
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"cannot subscribe: {type(exc).__name__}") from exc
        self._psub = psub
        self._presence_healthy = True
        self._consumer = asyncio.create_task(self._consume_presence(), name="presence")

    async def _subscribe_presence(self) -> JetStreamContext.PullSubscription:
        """Make sure stream and durable consumer exist and bind a pull subscription to them."""
        assert self._js is not None
        s = self._settings
        await self._ensure_presence_stream()
        js = self._js
        stream, durable = self.subjects.presence_stream, self.subjects.presence_consumer
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            filter_subject=self.subjects.all_presence(),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=s.presence_ack_wait_s,
            max_deliver=-1,
        )

        async def bind() -> JetStreamContext.PullSubscription:
            # create or update (the server's default action): an existing durable takes the
            # settings of this process, e.g. a shorter ack wait
            try:
                await js.add_consumer(stream, config=config)
            except nats.js.errors.BadRequestError as exc:
                # a server that cannot change it in place: use it as it is, if it exists
                await js.consumer_info(stream, durable)
                log.warning(
                    "presence consumer kept with its own settings",
                    extra={"error": exc.description},
                )
            return await js.pull_subscribe_bind(durable=durable, stream=stream)

        try:
            return await asyncio.wait_for(bind(), s.request_timeout_s)
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"presence consumer unavailable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        """Stop the consumers, cancel best-effort sends and drain the connection (bounded)."""
        self._closing = True
        pending = [t for t in (self._consumer, *self._tasks) if t is not None]
        for task in pending:
            task.cancel()
        if pending:
            # bounded: a task that swallows its cancellation must not hold up shutdown
            await asyncio.wait(pending, timeout=self._settings.nats_drain_timeout_s)
        if self._psub is not None:
            # an idle pull subscription would hold up the drain until its timeout
            with contextlib.suppress(nats.errors.Error):
                await self._psub.unsubscribe()
            self._psub = None
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), self._settings.nats_drain_timeout_s)
            except (TimeoutError, nats.errors.Error):
                # reconnecting or too slow to drain: shutdown must still finish
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._nc.close(), self._settings.nats_drain_timeout_s)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def gave_up(self) -> bool:
        """The client closed the connection for good without ``close`` (its reconnect budget is
        spent): only a restart of the process brings the bus back."""
        return self._nc is not None and self._nc.is_closed and not self._closing

    @property
    def presence_healthy(self) -> bool:
        """False while the presence consumer is known to be gone and being recreated."""
        return self._presence_healthy

    # requests

    async def request_agent(
        self, agent_id: str, frame: CommandFrame, timeout_s: float
    ) -> CommandReply:
        subject = self.subjects.agent_commands(agent_id)
        if self._nc is None or not self._nc.is_connected:
            raise BusUnavailable("NATS is not connected")
        try:
            msg = await self._nc.request(subject, encode(frame), timeout=timeout_s)
        except nats.errors.NoRespondersError:
            raise AgentOffline(agent_id) from None
        except nats.errors.TimeoutError:
            raise AgentTimeout(agent_id) from None
        except nats.errors.Error as exc:
            raise BusUnavailable(type(exc).__name__) from None
        try:
            result = decode_command_result(msg.data)
        except ProtocolError as exc:
            raise AgentRefused(ErrorCode.AGENT_ERROR, f"malformed reply: {exc.message}") from None
        if isinstance(result, CommandFailed):
            raise AgentRefused(result.code, result.message)
        if result.agent_id != agent_id:
            raise AgentRefused(ErrorCode.AGENT_ERROR, "reply stamped with another agent")
        return result

    async def subscribe_session(self, session_id: str) -> _NatsSessionSubscription:
        subject = self.subjects.session_up(session_id)
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise BusUnavailable("NATS is not connected")
        s = self._settings
        try:
            # No flush (a round trip per command): the SUB is queued on this connection before
            # the request that feeds it, and a NATS server handles one connection's protocol
            # in order, so the interest exists before the request reaches anyone. In a cluster
            # the interest travels to each route ahead of the request on that same route.
            # (nats-py's own subscribe-then-publish request relies on exactly this.)
            sub = await nc.subscribe(
                subject,
                pending_msgs_limit=s.session_sub_pending_msgs,
                pending_bytes_limit=s.session_sub_pending_bytes,
            )
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"cannot subscribe: {type(exc).__name__}") from None
        sid: int = sub._id  # nats-py names a subscription by its sid in SlowConsumerError
        wrapped = _NatsSessionSubscription(
            sub, session_id, on_close=lambda: self._session_subs.pop(sid, None)
        )
        self._session_subs[sid] = wrapped
        return wrapped

    async def publish_session_down(self, session_id: str, frame: DownFrame) -> None:
        subject = self.subjects.session_down(session_id)
        if self._nc is None or not self._nc.is_connected:
            raise BusUnavailable("NATS is not connected")
        try:
            await self._nc.publish(subject, encode(frame))
        except nats.errors.Error as exc:
            raise BusUnavailable(type(exc).__name__) from None

    def send_best_effort(self, agent_id: str, frame: CommandFrame, timeout_s: float) -> None:
        task = asyncio.create_task(self._best_effort(agent_id, frame, timeout_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _best_effort(self, agent_id: str, frame: CommandFrame, timeout_s: float) -> None:
        try:
            await self.request_agent(agent_id, frame, timeout_s)
        except BusError as exc:
            log.info(
                "best-effort command not delivered",
                extra={"agent_id": agent_id, "frame_type": frame.type, "error": str(exc)},
            )

    async def publish_revocation(self, agent_id: str, not_before: datetime) -> None:
        key = validate_id(agent_id, what="agent_id")
        try:
            kv = await self._revocations()
            await kv.put(key, not_before.isoformat().encode())
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"revocation not stored: {type(exc).__name__}") from None

    async def _revocations(self) -> KeyValue:
        if self._kv is None:
            if self._js is None:
                raise BusUnavailable("NATS is not connected")
            try:
                self._kv = await self._js.key_value(self.subjects.revocation_bucket)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await self._js.create_key_value(
                    KeyValueConfig(
                        bucket=self.subjects.revocation_bucket,
                        history=1,
                        storage=StorageType.FILE,
                        replicas=self._settings.jetstream_replicas,
                    )
                )
        return self._kv

    # consumers

    async def _ensure_presence_stream(self) -> None:
        assert self._js is not None
        config = StreamConfig(
            name=self.subjects.presence_stream,
            subjects=[self.subjects.all_presence()],
            storage=StorageType.FILE,
            max_age=PRESENCE_STREAM_MAX_AGE_S,
            duplicate_window=PRESENCE_STREAM_DUPLICATE_WINDOW_S,
            num_replicas=self._settings.jetstream_replicas,
        )
        try:
            await asyncio.wait_for(self._js.add_stream(config), self._settings.request_timeout_s)
        except nats.js.errors.BadRequestError as exc:
            # another part created it with other (compatible) settings: use it as it is
            if exc.err_code != _STREAM_EXISTS_DIFFERENT:
                raise BusUnavailable(f"presence stream refused: {exc.description}") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"presence stream unavailable: {type(exc).__name__}") from exc

    async def _consume_presence(self) -> None:
        s = self._settings
        errors = 0
        last_check = time.monotonic()
        while not self._stopping():
            psub = self._psub
            if psub is None or not self._presence_healthy:
                await self._recreate_presence_consumer()
                errors, last_check = 0, time.monotonic()
                continue
            try:
                msgs = await psub.fetch(s.presence_fetch_batch, timeout=s.presence_fetch_timeout_s)
            except TimeoutError:
                # nothing to fetch (nats-py raises its own or asyncio's TimeoutError); a deleted
                # consumer looks the same, so look at it now and then
                if time.monotonic() - last_check >= s.presence_check_interval_s:
                    last_check = time.monotonic()
                    if await self._presence_consumer_gone(psub):
                        self._mark_presence_down("presence consumer or stream not found")
                continue
            except Exception as exc:
                # disconnected, reconnecting, consumer gone...: the loop must never die
                errors += 1
                log.warning("presence fetch failed", extra={"error": type(exc).__name__})
                if errors >= s.presence_max_fetch_errors:
                    self._mark_presence_down(f"{errors} consecutive fetch errors")
                    continue
                await asyncio.sleep(s.presence_nak_delay_s or 0.1)
                continue
            errors = 0
            await self._handle_batch(msgs)

    async def _handle_batch(self, msgs: list[Msg]) -> None:
        """Handle ``msgs`` in order while the ones not handled yet are kept in progress."""
        pending = list(msgs)
        keeper = asyncio.create_task(self._keep_in_progress(pending), name="presence-wip")
        try:
            while pending:
                await self._handle_presence(pending[0])
                pending.pop(0)
        finally:
            keeper.cancel()
            # wait, not await: a cancel of this task itself must not be swallowed here
            await asyncio.wait([keeper], timeout=self._settings.request_timeout_s)

    async def _keep_in_progress(self, pending: list[Msg]) -> None:
        interval = self._settings.presence_ack_wait_s / 3
        while True:
            await asyncio.sleep(interval)
            for msg in list(pending):
                if not msg.is_acked:  # acked, nak'ed or terminated meanwhile: leave it alone
                    with contextlib.suppress(nats.errors.Error):
                        await msg.in_progress()

    async def _presence_consumer_gone(self, psub: JetStreamContext.PullSubscription) -> bool:
        try:
            await asyncio.wait_for(psub.consumer_info(), self._settings.request_timeout_s)
        except nats.js.errors.NotFoundError:
            return True
        except (TimeoutError, nats.errors.Error) as exc:
            # NATS itself is unwell: readiness reports that through ``connected``
            log.info("presence consumer check failed", extra={"error": type(exc).__name__})
        return False

    def _stopping(self) -> bool:
        """True once ``close`` began or the running task was asked to stop.

        The consumer loops test this instead of trusting cancellation alone: once the connection
        is closed, nats-py turns a ``CancelledError`` inside ``next_msg`` into
        ``ConnectionClosedError``, which the loops' ``except Exception`` would otherwise retry
        forever (seen as a shutdown that never ends).
        """
        task = asyncio.current_task()
        return self._closing or (task is not None and task.cancelling() > 0)

    def _mark_presence_down(self, why: str) -> None:
        log.warning("presence consumer down; recreating it", extra={"error": why})
        self._presence_healthy = False

    async def _recreate_presence_consumer(self) -> None:
        """Recreate stream, durable consumer and pull subscription; back off between failed
        attempts (each bounded by ``request_timeout_s``) until it works or the task ends."""
        s = self._settings
        delay = s.presence_resubscribe_backoff_s
        while not self._stopping():
            old, self._psub = self._psub, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(old.unsubscribe(), s.request_timeout_s)
            try:
                self._psub = await self._subscribe_presence()
            except BusUnavailable as exc:
                log.warning("presence consumer not recreated; retrying", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, s.presence_resubscribe_backoff_max_s)
                continue
            self._presence_healthy = True
            log.info("presence consumer recreated")
            return

    async def _handle_presence(self, msg: Msg) -> None:
        try:
            event = decode_presence(msg.data)
            if msg.subject != self.subjects.presence(event.agent_id):
                raise ProtocolError(ErrorCode.NOT_YOUR_SESSION, "subject names another agent")
        except ProtocolError as exc:
            log.warning("presence event refused", extra={"code": exc.code, "error": exc.message})
            self._metrics.presence_event("unknown", "refused")
            with contextlib.suppress(nats.errors.Error):
                await msg.term()
            return
        try:
            sequence = msg.metadata.sequence.stream
        except Exception:
            # not a JetStream message: nothing to order it by, so it cannot be handled
            log.warning("presence message without stream metadata refused")
            self._metrics.presence_event(event.type, "refused")
            return
        try:
            await self._handlers.on_presence(event, sequence)
        except Exception:
            log.exception(
                "presence handler failed; redelivering",
                extra={"agent_id": event.agent_id, "conn_id": event.conn_id},
            )
            self._metrics.presence_event(event.type, "failed")
            with contextlib.suppress(nats.errors.Error):
                await msg.nak(delay=self._settings.presence_nak_delay_s)
            return
        self._metrics.presence_event(event.type, "handled")
        # an ack lost here means a redelivery, which the idempotent handler absorbs
        with contextlib.suppress(nats.errors.Error):
            await msg.ack()

    async def _on_agent_event(self, msg: Msg) -> None:
        kind = self.subjects.event_kind(msg.subject)
        if kind != "heartbeat":
            log.debug("agent event ignored", extra={"kind": (kind or "")[:64]})
            return
        try:
            heartbeat = decode_agent_heartbeat(msg.data)
            if msg.subject != self.subjects.agent_events(heartbeat.agent_id, "heartbeat"):
                raise ProtocolError(ErrorCode.NOT_YOUR_SESSION, "subject names another agent")
            await self._handlers.on_agent_heartbeat(heartbeat)
        except ProtocolError as exc:
            log.warning("agent event refused", extra={"code": exc.code, "error": exc.message})
        except Exception:
            log.exception("agent heartbeat handler failed")

    async def _on_gateway_heartbeat(self, msg: Msg) -> None:
        try:
            heartbeat = decode_gateway_heartbeat(msg.data)
            renewed = await self._handlers.on_gateway_heartbeat(heartbeat)
        except ProtocolError as exc:
            log.warning("gateway heartbeat refused", extra={"code": exc.code, "error": exc.message})
            return
        except Exception:
            log.exception("gateway heartbeat handler failed")
            return
        if not renewed and self._nc is not None and self._nc.is_connected:
            # the gateway has not noticed it lost its lease: make it fence itself now, or it
            # would keep serving sockets whose sessions this API already closed
            notice = GatewayLeaseLost(gateway_id=heartbeat.gateway_id, boot_id=heartbeat.boot_id)
            with contextlib.suppress(nats.errors.Error):
                await self._nc.publish(self.subjects.gateway_control(), encode(notice))

    # connection callbacks (logging only: readiness reads ``connected``)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            session_sub = self._session_subs.get(exc.sid)
            if session_sub is not None:
                # one dropped frame; the reader yields a FramesDropped marker for it
                session_sub.note_dropped()
                return
        log.warning("nats error", extra={"error": type(exc).__name__})

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats disconnected")

    async def _on_closed(self) -> None:
        if not self._closing:
            log.error(
                "nats connection closed for good (reconnect budget spent); "
                "liveness fails until the process is restarted"
            )

    async def _on_reconnected(self) -> None:
        log.info("nats reconnected")
        self._metrics.nats_reconnected()
