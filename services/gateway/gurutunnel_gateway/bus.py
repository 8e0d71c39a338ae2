"""The gateway's NATS adapter: the only module of the gateway that imports ``nats``.

Contract:
- One long-lived connection per gateway (``NatsBus.connect``) with the client pings and
  reconnect budget from the settings, and one JetStream context.
- ``ensure_presence_stream`` creates the presence stream (``Subjects.presence_stream``,
  ``[Subjects.all_presence()]``, file storage, max age and duplicate window from
  ``subjects.py``) if it does not exist; ``watch_revocations`` creates the revocation bucket if
  missing and calls back for every key (initial snapshot, then live updates).
- ``publish_durable`` publishes through JetStream with ``Nats-Msg-Id`` (de-duplication) and
  waits for the stream's ack within a timeout.
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
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import nats
import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType, StreamConfig

from gurutunnel_protocol import Subjects
from gurutunnel_protocol.subjects import (
    PRESENCE_STREAM_DUPLICATE_WINDOW_S,
    PRESENCE_STREAM_MAX_AGE_S,
)

from .config import GatewaySettings

log = logging.getLogger(__name__)

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
    ) -> None: ...

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
    def __init__(self, sub: Any) -> None:
        self._sub = sub

    async def unsubscribe(self) -> None:
        # Unsubscribing a closed connection or a gone subscription is not an error here:
        # the subscription is gone either way.
        with contextlib.suppress(*_NATS_ERRORS):
            await self._sub.unsubscribe()


class NatsBus:
    """``Bus`` over one real NATS connection."""

    def __init__(self, settings: GatewaySettings, subjects: Subjects) -> None:
        self._settings = settings
        self._subjects = subjects
        self._nc: Any = None
        self._js: Any = None
        self._watcher: Any = None
        self._watch_task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        s = self._settings

        async def on_error(exc: Exception) -> None:
            log.warning("nats error: %s", type(exc).__name__)

        async def on_disconnected() -> None:
            log.warning("nats disconnected")

        async def on_reconnected() -> None:
            log.info("nats reconnected")

        try:
            self._nc = await nats.connect(
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
            )
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None
        self._js = self._nc.jetstream(timeout=s.publish_timeout_s)

    @property
    def connected(self) -> bool:
        return self._nc is not None and bool(self._nc.is_connected)

    async def close(self) -> None:
        """Stop the revocation watch, flush and close the connection (idempotent)."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        if self._watcher is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await self._watcher.stop()
            self._watcher = None
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(*_NATS_ERRORS):
                await asyncio.wait_for(self._nc.drain(), self._settings.publish_timeout_s)
            with contextlib.suppress(*_NATS_ERRORS):
                await self._nc.close()

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

    async def publish_durable(
        self, subject: str, payload: bytes, *, msg_id: str, timeout_s: float
    ) -> None:
        if self._js is None:
            raise BusUnavailable("bus not connected")
        try:
            await self._js.publish(
                subject, payload, timeout=timeout_s, headers={"Nats-Msg-Id": msg_id}
            )
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None

    async def subscribe(self, subject: str, handler: MessageHandler) -> BusSubscription:
        if self._nc is None:
            raise BusUnavailable("bus not connected")

        async def on_message(msg: Any) -> None:
            try:
                await handler(msg.data, msg.reply or None)
            except Exception:
                # A handler bug must not kill the subscription's delivery task.
                log.exception("bus handler failed", extra={"subject": subject})

        try:
            sub = await self._nc.subscribe(subject, cb=on_message)
            # The server knows the interest once the flush returns: subscribe-before-publish.
            await self._nc.flush(timeout=self._settings.publish_timeout_s)
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None
        return _NatsSubscription(sub)

    async def watch_revocations(
        self, handler: RevocationHandler, *, snapshot_timeout_s: float
    ) -> None:
        """Create the revocation bucket if missing, deliver its current keys, then watch it.

        Returns once the initial snapshot was delivered (bounded by ``snapshot_timeout_s``);
        live updates keep arriving on a background task until ``close``.
        """
        bucket = self._subjects.revocation_bucket
        try:
            try:
                kv = await self._js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                kv = await self._js.create_key_value(
                    KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE)
                )
            self._watcher = await kv.watchall()
        except _NATS_ERRORS as exc:
            raise _translate(exc) from None
        snapshot_done = asyncio.get_running_loop().create_future()

        async def pump() -> None:
            async for entry in self._watcher:
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
