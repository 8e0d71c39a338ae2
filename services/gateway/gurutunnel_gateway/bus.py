"""The gateway's NATS adapter: the only module of the gateway that imports ``nats``.

Contract:
- One long-lived connection per gateway (``NatsBus.connect``) with the client pings and
  reconnect budget from the settings, and one JetStream context.
- ``ensure_presence_stream`` creates the presence stream (``Subjects.presence_stream``,
  ``[Subjects.all_presence()]``, file storage, max age and duplicate window from
  ``subjects.py``) if it does not exist; ``watch_revocations`` creates the revocation bucket if
  missing and calls back for every key (initial snapshot, then live updates). After every
  reconnect the watch is made again (its ordered consumer lives in the server's memory: a
  restarted server lost it, and nats-py alone would notice only after two missed idle
  heartbeats, 10 s or more), retried with backoff until it works or the bus closes; the new
  snapshot delivers every key again, so the handler must be idempotent.
- Reconnect budget: ``nats_max_reconnect_attempts`` -1 (the default; nats-py treats 0 alike)
  reconnects forever and ``connected`` is False during an outage (readiness fails). With N > 0
  the client closes the connection for good after N + 1 failed attempts; ``gave_up`` is then
  True and stays so (the server answers ``/healthz`` 503, so the liveness probe restarts the
  process).
- ``publish_durable`` publishes through JetStream with ``Nats-Msg-Id`` (de-duplication), waits
  for the stream's ack within a timeout and returns the message's stream sequence (a retried
  publish that the stream de-duplicated returns the sequence of the stored original).
- ``subscribe`` returns once the server knows the interest (a PING/PONG round trip after the
  SUB, shared by the subscriptions of one loop turn). Each subscription's handler gets its
  messages one at a time in arrival order, concurrently with other subscriptions; a handler's
  exception is logged and delivery goes on. An idle subscription holds no task and no queue
  (``_Inbox``: a delivery task lives only while messages wait). At most
  ``SUB_PENDING_MSGS_LIMIT`` messages and ``SUB_PENDING_BYTES_LIMIT`` bytes wait per
  subscription; past either a message is dropped and logged (``SlowConsumerError``).
  ``unsubscribe`` cancels the handler running and discards waiting messages; ``close`` drains
  (messages already received are handled first, within ``publish_timeout_s``).
- Nothing above this module sees a NATS exception type; failures raise::

    BusError            any bus failure
     +-- BusUnavailable not connected, connection closed, buffer full, no stream
     +-- BusTimeout     no answer (ack, flush) within the timeout

``Bus`` is the interface the rest of the gateway uses, so a unit test can use a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.client import _validate_subject
from nats.aio.msg import Msg
from nats.aio.subscription import (
    DEFAULT_SUB_PENDING_BYTES_LIMIT,
    DEFAULT_SUB_PENDING_MSGS_LIMIT,
    Subscription,
)
from nats.js.api import KeyValueConfig, StorageType, StreamConfig

from gurutunnel_protocol import Subjects
from gurutunnel_protocol.subjects import (
    PRESENCE_STREAM_DUPLICATE_WINDOW_S,
    PRESENCE_STREAM_MAX_AGE_S,
)

from .config import GatewaySettings

log = logging.getLogger(__name__)


SUB_PENDING_MSGS_LIMIT = DEFAULT_SUB_PENDING_MSGS_LIMIT
"""Messages one subscription may hold waiting for its handler (nats-py's default); more are
dropped as a slow consumer (see ``_Inbox``)."""

SUB_PENDING_BYTES_LIMIT = DEFAULT_SUB_PENDING_BYTES_LIMIT
"""Payload bytes one subscription may hold waiting for its handler (nats-py's default)."""


class _Client(NatsClient):
    """nats-py's client with one repair and one addition (both match nats-py 2.16.0).

    Repair: the PONG of a flush whose future was cancelled. A ``flush()`` that is cancelled (its
    caller's task cancelled, or its own timeout) leaves a cancelled future in the client's PONG
    queue; nats-py 2.16 calls ``set_result`` on it when the PONG arrives, the
    ``InvalidStateError`` ends the read loop, and the client then hears nothing (no messages,
    no replies) until its own pings declare the connection stale. Here such a PONG is counted
    and dropped like any other.

    Addition: ``subscribe_dispatched``, a callback subscription without a task and a queue of
    its own while idle (see ``_Inbox``). nats-py's ``subscribe(cb=...)`` starts one task (its
    ``_wait_for_msgs`` coroutine) and one ``asyncio.Queue`` per subscription, about 4 KiB that
    every connected agent's command subject held for nothing. nats-py has no public hook for
    this, so it leans on private parts, each covered by tests/integration/gateway/
    test_bus_dispatch.py: ``_validate_subject``, ``_sid``, ``_subs`` and ``_send_subscribe``
    (what ``subscribe`` does), the read loop handing each message to
    ``sub._pending_queue.put_nowait`` after its byte check on ``sub._pending_size``, and
    ``unsubscribe``/``close`` cancelling ``sub._wait_for_msgs_task``.
    """

    async def _process_pong(self) -> None:
        if self._pongs and self._pongs[0].done():
            self._pongs.pop(0)
            self._pongs_received += 1
            self._pings_outstanding = 0
            return
        await super()._process_pong()

    async def subscribe_dispatched(self, subject: str, handler: MessageHandler) -> Subscription:
        """Subscribe ``subject``; ``handler`` gets each message (see ``_Inbox``).

        What nats-py 2.16's ``subscribe`` does for a callback subscription, except that the
        subscription's pending queue is an ``_Inbox`` and no task is started."""
        _validate_subject(subject, strict=True)  # what subscribe() checks
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining:
            raise nats.errors.ConnectionDrainingError
        inbox = _Inbox(handler)
        self._sid += 1
        sub = Subscription(
            self,
            self._sid,
            subject,
            cb=inbox.handle,
            pending_msgs_limit=SUB_PENDING_MSGS_LIMIT,
            pending_bytes_limit=SUB_PENDING_BYTES_LIMIT,
        )
        inbox.attach(sub)
        self._subs[sub._id] = sub
        await self._send_subscribe(sub)
        return sub


class _Inbox:
    """A dispatched subscription's waiting messages, in place of its ``asyncio.Queue``.

    Delivery: the read loop hands each message to ``put_nowait``; the first one of a burst
    starts a delivery task that calls the handler for each message in arrival order, one at a
    time, and ends once none is left (the next message starts a new one). An idle subscription
    holds no task and no queue; subscriptions are handled concurrently, as with nats-py's task
    per subscription. The task is the subscription's ``_wait_for_msgs_task`` while it lives,
    so ``unsubscribe`` and the client's ``close`` cancel it as they cancel nats-py's own (the
    running handler is cancelled, waiting messages are discarded), and a drain (``join``) waits
    for it.

    A handler's exception is logged and delivery goes on. Slow consumer: at most
    ``SUB_PENDING_MSGS_LIMIT`` messages and ``SUB_PENDING_BYTES_LIMIT`` payload bytes wait per
    subscription; past either nats-py drops the message and reports a ``SlowConsumerError``
    to the client's error callback (logged as a warning).

    Only the part of ``asyncio.Queue`` that nats-py 2.16 uses on a callback subscription's
    ``_pending_queue`` is here: ``put_nowait`` (raising ``asyncio.QueueFull``), ``qsize``
    (``pending_msgs``), ``empty`` (``unsubscribe``), ``join`` (``drain``) and ``task_done``.
    """

    __slots__ = ("_handler", "_messages", "_sub")

    def __init__(self, handler: MessageHandler) -> None:
        self._handler = handler
        self._messages: deque[Msg] | None = None  # None while idle: an empty deque is ~600 B
        self._sub: Subscription | None = None

    def attach(self, sub: Subscription) -> None:
        self._sub = sub
        # the queue nats-py made for it is dropped: this inbox stands in for it
        sub._pending_queue = self  # type: ignore[assignment]

    def put_nowait(self, msg: Msg) -> None:
        sub = self._sub
        assert sub is not None, "inbox used before attach"
        messages = self._messages
        if messages is None:
            messages = self._messages = deque()
        elif 0 < sub._pending_msgs_limit <= len(messages):
            raise asyncio.QueueFull
        messages.append(msg)
        task = sub._wait_for_msgs_task
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(
                self._deliver(sub, messages), name="nats-dispatch"
            )
            # nats-py declares the attribute None-typed; its own task lives there too
            sub._wait_for_msgs_task = task  # type: ignore[assignment]

    def qsize(self) -> int:
        return len(self._messages) if self._messages is not None else 0

    def empty(self) -> bool:
        return not self._messages

    def task_done(self) -> None:
        """nats-py calls it only from ``next_msg``, which a callback subscription refuses."""

    async def join(self) -> None:
        """Wait until every message put so far was handled (a drain); a cancel of the caller
        leaves the delivery running."""
        while self._sub is not None:
            task = self._sub._wait_for_msgs_task
            if task is None or task.done():
                return
            await asyncio.wait([task])

    async def handle(self, msg: Msg) -> None:
        """Call the handler; its failure is logged, never raised (delivery goes on)."""
        try:
            await self._handler(msg.data, msg.reply or None)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # unsubscribe or close
            # a cancellation that was not ours (a future the handler awaited): not the end
            log.error("bus handler was cancelled", extra={"subject": msg.subject})
        except Exception:
            log.exception("bus handler failed", extra={"subject": msg.subject})

    async def _deliver(self, sub: Subscription, messages: deque[Msg]) -> None:
        try:
            while messages:
                msg = messages.popleft()
                sub._pending_size -= len(msg.data)
                await self.handle(msg)
        finally:
            # No await since ``messages`` was seen empty: a message put after this starts a new
            # task. Cancelled (unsubscribe, close): what is left is discarded, as by nats-py.
            if sub._wait_for_msgs_task is asyncio.current_task():
                sub._wait_for_msgs_task = None
            if self._messages is messages:
                self._messages = None
                if messages:
                    sub._pending_size = 0


async def _connect(**options: Any) -> NatsClient:
    """``nats.connect`` with :class:`_Client`."""
    nc = _Client()
    await nc.connect(**options)
    return nc


_FLUSHER_TURNS = 50
"""Loop turns a subscription round trip waits at most for nats-py's flusher to write the SUBs."""

MessageHandler = Callable[[bytes, str | None], Awaitable[None]]
"""Called with (payload, reply subject or None) for each message of a subscription."""

RevocationHandler = Callable[[str, bytes | None], None]
"""Called with (agent_id, not_before value, or None when the key was deleted)."""


class BusError(Exception):
    """A bus operation failed."""


class BusUnavailable(BusError):
    """NATS is not reachable, the connection is closed or the stream is missing."""


class BusTimeout(BusError):
    """No answer within the timeout."""


class BusSubscription(Protocol):
    async def unsubscribe(self) -> None: ...


class Bus(Protocol):
    """What the gateway needs from the bus."""

    @property
    def connected(self) -> bool: ...

    async def publish(self, subject: str, payload: bytes) -> None: ...

    async def publish_durable(
        self, subject: str, payload: bytes, *, msg_id: str, timeout_s: float
    ) -> int: ...

    async def subscribe(self, subject: str, handler: MessageHandler) -> BusSubscription: ...


def _translate(exc: BaseException) -> BusError:
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        return BusTimeout(f"bus timeout: {type(exc).__name__}")
    return BusUnavailable(f"bus unavailable: {type(exc).__name__}: {exc}"[:300])


_NATS_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    asyncio.TimeoutError,
    OSError,
)


class _NatsSubscription:
    __slots__ = ("_sub",)

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    async def unsubscribe(self) -> None:
        # Unsubscribing a closed connection or a gone subscription is not an error here:
        # the subscription is gone either way.
        with contextlib.suppress(*_NATS_ERRORS):
            await self._sub.unsubscribe()


class NatsBus:
    """``Bus`` over one real NATS connection."""

    def __init__(
        self,
        settings: GatewaySettings,
        subjects: Subjects,
        *,
        on_reconnected: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._subjects = subjects
        self._on_reconnected = on_reconnected  # counts reconnects (metrics)
        self._nc: Any = None
        self._flushes: set[asyncio.Task[None]] = set()  # see publish_flushed
        self._sub_round_trip: asyncio.Task[None] | None = None  # see _subscriptions_flushed
        self._js: Any = None
        self._watcher: Any = None
        self._watch_task: asyncio.Task[None] | None = None
        self._revocation_handler: RevocationHandler | None = None
        self._rewatch_task: asyncio.Task[None] | None = None
        self._closing = False

    async def connect(self) -> None:
        s = self._settings

        async def on_error(exc: Exception) -> None:
            log.warning("nats error: %s", type(exc).__name__)

        async def on_disconnected() -> None:
            log.warning("nats disconnected")

        async def on_reconnected() -> None:
            log.info("nats reconnected")
            if self._on_reconnected is not None:
                self._on_reconnected()
            self._restart_revocation_watch()

        async def on_closed() -> None:
            if not self._closing:
                log.error(
                    "nats connection closed for good (reconnect budget spent); "
                    "liveness fails until the process is restarted"
                )

        try:
            self._nc = await _connect(
                servers=[s.nats_url],
                name=f"gurutunnel-gateway-{s.gateway_id}",
                connect_timeout=s.nats_connect_timeout_s,
                reconnect_time_wait=s.nats_reconnect_wait_s,
                max_reconnect_attempts=s.nats_max_reconnect_attempts,
                ping_interval=s.nats_ping_interval_s,
                max_outstanding_pings=s.nats_max_outstanding_pings,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                closed_cb=on_closed,
            )
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None
        self._js = self._nc.jetstream(timeout=s.publish_timeout_s)

    @property
    def connected(self) -> bool:
        return self._nc is not None and bool(self._nc.is_connected)

    @property
    def gave_up(self) -> bool:
        """The client closed the connection for good without ``close`` (its reconnect budget is
        spent): only a restart of the process brings the bus back."""
        return self._nc is not None and bool(self._nc.is_closed) and not self._closing

    async def close(self) -> None:
        """Stop the revocation watch, flush and close the connection (idempotent)."""
        self._closing = True
        rewatch, self._rewatch_task = self._rewatch_task, None
        if rewatch is not None:
            rewatch.cancel()
            await asyncio.wait([rewatch], timeout=self._settings.publish_timeout_s)
        await self._stop_watch()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(*_NATS_ERRORS):
                await asyncio.wait_for(self._nc.drain(), self._settings.publish_timeout_s)
            with contextlib.suppress(*_NATS_ERRORS):
                await self._nc.close()
        # closed: no PONG can come any more, so cancelling the round trips is safe now
        for flush in list(self._flushes):
            flush.cancel()

    async def ensure_presence_stream(self) -> None:
        name = self._subjects.presence_stream
        try:
            try:
                await self._js.stream_info(name)
                return
            except nats.js.errors.NotFoundError:
                pass
            # Same config as the API's, so a concurrent creation by either side is idempotent.
            await self._js.add_stream(
                StreamConfig(
                    name=name,
                    subjects=[self._subjects.all_presence()],
                    storage=StorageType.FILE,
                    max_age=PRESENCE_STREAM_MAX_AGE_S,
                    duplicate_window=PRESENCE_STREAM_DUPLICATE_WINDOW_S,
                    num_replicas=self._settings.jetstream_replicas,
                )
            )
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None

    async def publish(self, subject: str, payload: bytes) -> None:
        if self._nc is None:
            raise BusUnavailable("bus not connected")
        try:
            await self._nc.publish(subject, payload)
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None

    async def publish_flushed(self, subject: str, payload: bytes, *, timeout_s: float) -> None:
        """Publish and wait until the server has it (a PING/PONG round trip), ``timeout_s`` at
        most; ``BusTimeout`` past it.

        A plain ``publish`` succeeds into the client's buffer even while NATS is down; the
        lease heartbeat must know it left. So must a flush: while nats-py reconnects, its read
        and flush loops are stopped and ``flush()`` returns at once without a round trip, so a
        disconnected client is refused up front. The round trip runs in a task of its own that
        this method never cancels: nats-py's read loop dies when a PONG arrives for a flush
        whose future was cancelled (a caller's timeout), and the connection would then hear
        nothing until its pings declare it stale. The task is bounded by a guard longer than
        that stale detection (a reconnect forgets pending PINGs), so it can end safely."""
        if self._nc is None or not self._nc.is_connected:
            raise BusUnavailable("bus not connected")
        try:
            await self._nc.publish(subject, payload)
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None
        s = self._settings
        guard_s = max(timeout_s, s.nats_ping_interval_s * (s.nats_max_outstanding_pings + 2))
        flush = asyncio.create_task(self._nc.flush(timeout=guard_s), name="nats-flush")
        self._flushes.add(flush)
        flush.add_done_callback(self._flush_done)
        done, _ = await asyncio.wait({flush}, timeout=timeout_s)
        if not done:
            raise BusTimeout(f"no flush round trip within {timeout_s:g}s")
        failure = flush.exception()
        if failure is not None:
            raise _translate(failure) from None

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if self._sub_round_trip is task:
            # cancelled before its first step (close()): the next subscribe starts a new one
            self._sub_round_trip = None
        if not task.cancelled():
            task.exception()  # retrieved: a late failure is not worth a warning

    async def publish_durable(
        self, subject: str, payload: bytes, *, msg_id: str, timeout_s: float
    ) -> int:
        if self._js is None:
            raise BusUnavailable("bus not connected")
        try:
            ack = await self._js.publish(
                subject, payload, timeout=timeout_s, headers={"Nats-Msg-Id": msg_id}
            )
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None
        seq: int = ack.seq
        return seq

    async def subscribe(self, subject: str, handler: MessageHandler) -> BusSubscription:
        if self._nc is None:
            raise BusUnavailable("bus not connected")

        try:
            # no task nor queue per subscription while idle (see _Client, _Inbox)
            sub = await self._nc.subscribe_dispatched(subject, handler)
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None
        # The server knows the interest once a PING sent after the SUB is answered:
        # subscribe-before-publish.
        subscription = _NatsSubscription(sub)
        try:
            await self._subscriptions_flushed()
        except BaseException:
            # not handed to the caller, so nobody else could end it: a stale handler would
            # keep answering for a connection that never started
            await subscription.unsubscribe()
            raise
        return subscription

    async def _subscriptions_flushed(self) -> None:
        """Wait for a PING/PONG round trip that follows every SUB queued so far.

        One round trip serves every subscription made in the same loop turn (a reconnect storm
        subscribes thousands of command subjects: one PING each was most of the handshake's bus
        work). The shared round trip is never cancelled by a waiter (see ``publish_flushed``
        for why a cancelled flush is harmful); a waiter gives up after ``publish_timeout_s``."""
        task = self._sub_round_trip
        if task is None:
            task = asyncio.create_task(self._round_trip(), name="nats-sub-flush")
            self._sub_round_trip = task
            self._flushes.add(task)
            task.add_done_callback(self._flush_done)
        timeout_s = self._settings.publish_timeout_s
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            raise BusTimeout(f"no flush round trip within {timeout_s:g}s")
        if task.cancelled():
            # the bus is closing; a waiter that was not cancelled must not see CancelledError
            raise BusUnavailable("bus closed during the subscription round trip")
        failure = task.exception()
        if failure is not None:
            raise _translate(failure) if not isinstance(failure, BusError) else failure

    async def _round_trip(self) -> None:
        # Subscriptions queued from here on wait for the next round trip.
        self._sub_round_trip = None
        # nats-py queues a SUB for its flusher task (woken by the subscribe, so before this
        # task) but writes a PING straight to the socket: let the flusher write the SUBs first,
        # else the PONG could come back before the server saw them. Bounded: a flusher stuck
        # in a congested drain for longer lets the PING go first (as a plain flush() would).
        for _ in range(_FLUSHER_TURNS):
            await asyncio.sleep(0)
            if not getattr(self._nc, "_pending_data_size", 0):
                break
        s = self._settings
        guard_s = max(
            s.publish_timeout_s, s.nats_ping_interval_s * (s.nats_max_outstanding_pings + 2)
        )
        try:
            await self._nc.flush(timeout=guard_s)
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None

    async def watch_revocations(
        self, handler: RevocationHandler, *, snapshot_timeout_s: float
    ) -> None:
        """Create the revocation bucket if missing, deliver its current keys, then watch it.

        Returns once the initial snapshot was delivered (bounded by ``snapshot_timeout_s``);
        live updates keep arriving on a background task until ``close``, across reconnects.
        """
        self._revocation_handler = handler
        await self._watch(handler, snapshot_timeout_s)

    async def _watch(self, handler: RevocationHandler, snapshot_timeout_s: float) -> None:
        bucket = self._subjects.revocation_bucket
        try:
            try:
                kv = await self._js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                kv = await self._js.create_key_value(
                    KeyValueConfig(
                        bucket=bucket,
                        history=1,
                        storage=StorageType.FILE,
                        replicas=self._settings.jetstream_replicas,
                    )
                )
            watcher = self._watcher = await kv.watchall()
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None
        snapshot_done = asyncio.get_running_loop().create_future()

        async def pump() -> None:
            async for entry in watcher:
                if entry is None:  # end of the initial snapshot
                    if not snapshot_done.done():
                        snapshot_done.set_result(None)
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                try:
                    handler(entry.key, None if deleted else bytes(entry.value or b""))
                except Exception:
                    log.exception("revocation handler failed")

        self._watch_task = asyncio.create_task(pump(), name="revocation-watch")
        try:
            await asyncio.wait_for(asyncio.shield(snapshot_done), snapshot_timeout_s)
        except TimeoutError:
            raise BusTimeout("revocation snapshot not received in time") from None

    async def _stop_watch(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            # wait, not await: a cancel of the caller itself must not be swallowed here
            await asyncio.wait([task], timeout=self._settings.publish_timeout_s)
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await watcher.stop()

    def _restart_revocation_watch(self) -> None:
        """Called on every reconnect (see the module contract); a rewatch still running for an
        earlier reconnect is replaced."""
        if self._revocation_handler is None or self._closing:
            return
        if self._rewatch_task is not None:
            self._rewatch_task.cancel()
        self._rewatch_task = asyncio.create_task(
            self._rewatch(self._revocation_handler), name="revocation-rewatch"
        )

    async def _rewatch(self, handler: RevocationHandler) -> None:
        s = self._settings
        delay = max(s.nats_reconnect_wait_s, 0.05)
        # not cancellation alone: nats-py may turn a CancelledError into its own error
        while not self._closing and self.connected:
            await self._stop_watch()
            try:
                await self._watch(handler, s.revocation_snapshot_timeout_s)
            except Exception as exc:
                # BusError, or anything else nats-py raises mid-reconnect: the loop must go on
                log.warning("revocation watch not restored; retrying: %s", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("revocation watch restored after a reconnect")
            return
