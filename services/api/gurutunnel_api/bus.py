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
- ``start()`` raises only ``BusUnavailable`` (connect, stream, consumer and subscriptions).
- Consumers: presence events come from the durable pull consumer ``Subjects.presence_consumer``
  on the stream ``Subjects.presence_stream`` (created idempotently with the parameters of
  ``subjects.py``); the handler gets the event and its JetStream stream sequence (the order in
  which the stream received it; no NATS type leaves this module). A message is acked only after
  its handler committed, nak'ed (redelivered after ``presence_nak_delay_s``) when the handler
  failed, and terminated when it cannot be decoded. Agent events and gateway heartbeats arrive
  through core NATS subscriptions in the queue group ``Subjects.api_queue``; a failing handler is
  logged and never stops a subscription.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeAlias

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
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
    encode,
)
from gurutunnel_protocol.messages import (
    AgentHeartbeat,
    ChannelClose,
    ChannelOpen,
    CommandFailed,
    CommandReply,
    GatewayHeartbeat,
    PresenceEvent,
    Terminal,
    TunnelClose,
    TunnelData,
    TunnelOpen,
)
from gurutunnel_protocol.subjects import (
    PRESENCE_STREAM_DUPLICATE_WINDOW_S,
    PRESENCE_STREAM_MAX_AGE_S,
)

from .config import ApiSettings

log = logging.getLogger(__name__)

CommandFrame: TypeAlias = (
    TunnelOpen | TunnelClose | TunnelData | ChannelOpen | ChannelClose | Terminal
)

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
class BusHandlers:
    """What the API does with each kind of inbound event (all must be idempotent)."""

    on_presence: Callable[[PresenceEvent, int], Awaitable[None]]
    """Called with the event and its JetStream stream sequence."""
    on_agent_heartbeat: Callable[[AgentHeartbeat], Awaitable[None]]
    on_gateway_heartbeat: Callable[[GatewayHeartbeat], Awaitable[None]]


class Bus(Protocol):
    """What the services need from the bus."""

    @property
    def connected(self) -> bool: ...

    async def request_agent(
        self, agent_id: str, frame: CommandFrame, timeout_s: float
    ) -> CommandReply: ...

    def send_best_effort(self, agent_id: str, frame: CommandFrame, timeout_s: float) -> None: ...

    async def publish_revocation(self, agent_id: str, not_before: datetime) -> None: ...


class NatsBus:
    """The real bus on one NATS connection."""

    def __init__(self, settings: ApiSettings, handlers: BusHandlers) -> None:
        self._settings = settings
        self._handlers = handlers
        self.subjects = Subjects(settings.subject_prefix)
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer: asyncio.Task[None] | None = None
        self._psub: JetStreamContext.PullSubscription | None = None
        self._presence_healthy = False
        self._closing = False

    # lifecycle

    async def start(self) -> None:
        """Connect, make sure the presence stream exists and start every consumer."""
        s = self._settings
        try:
            self._nc = await asyncio.wait_for(
                nats.connect(
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
        try:
            return await asyncio.wait_for(
                self._js.pull_subscribe(
                    self.subjects.all_presence(),
                    durable=self.subjects.presence_consumer,
                    stream=self.subjects.presence_stream,
                    config=ConsumerConfig(
                        ack_policy=AckPolicy.EXPLICIT,
                        deliver_policy=DeliverPolicy.ALL,
                        ack_wait=s.presence_ack_wait_s,
                        max_deliver=-1,
                    ),
                ),
                s.request_timeout_s,
            )
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailable(f"presence consumer unavailable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        """Stop the consumers, cancel best-effort sends and drain the connection (bounded)."""
        self._closing = True
        pending = [t for t in (self._consumer, *self._tasks) if t is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
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
                    KeyValueConfig(bucket=self.subjects.revocation_bucket, history=1)
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
        while True:
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
            for msg in msgs:
                await self._handle_presence(msg)

    async def _presence_consumer_gone(self, psub: JetStreamContext.PullSubscription) -> bool:
        try:
            await asyncio.wait_for(psub.consumer_info(), self._settings.request_timeout_s)
        except nats.js.errors.NotFoundError:
            return True
        except (TimeoutError, nats.errors.Error) as exc:
            # NATS itself is unwell: readiness reports that through ``connected``
            log.info("presence consumer check failed", extra={"error": type(exc).__name__})
        return False

    def _mark_presence_down(self, why: str) -> None:
        log.warning("presence consumer down; recreating it", extra={"error": why})
        self._presence_healthy = False

    async def _recreate_presence_consumer(self) -> None:
        """Recreate stream, durable consumer and pull subscription; back off between failed
        attempts (each bounded by ``request_timeout_s``) until it works or the task ends."""
        s = self._settings
        delay = s.presence_resubscribe_backoff_s
        while True:
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
            with contextlib.suppress(nats.errors.Error):
                await msg.term()
            return
        try:
            sequence = msg.metadata.sequence.stream
        except Exception:
            # not a JetStream message: nothing to order it by, so it cannot be handled
            log.warning("presence message without stream metadata refused")
            return
        try:
            await self._handlers.on_presence(event, sequence)
        except Exception:
            log.exception(
                "presence handler failed; redelivering",
                extra={"agent_id": event.agent_id, "conn_id": event.conn_id},
            )
            with contextlib.suppress(nats.errors.Error):
                await msg.nak(delay=self._settings.presence_nak_delay_s)
            return
        # an ack lost here means a redelivery, which the idempotent handler absorbs
        with contextlib.suppress(nats.errors.Error):
            await msg.ack()

    async def _on_agent_event(self, msg: Msg) -> None:
        kind = msg.subject.rsplit(".", 1)[-1]
        if kind != "heartbeat":
            log.debug("agent event ignored", extra={"kind": kind[:64]})
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
            await self._handlers.on_gateway_heartbeat(decode_gateway_heartbeat(msg.data))
        except ProtocolError as exc:
            log.warning("gateway heartbeat refused", extra={"code": exc.code, "error": exc.message})
        except Exception:
            log.exception("gateway heartbeat handler failed")

    # connection callbacks (logging only: readiness reads ``connected``)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats error", extra={"error": type(exc).__name__})

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats disconnected")

    async def _on_reconnected(self) -> None:
        log.info("nats reconnected")
