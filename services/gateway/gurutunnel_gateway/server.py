"""The gateway process: accept agent sockets (auth before upgrade), health, lease, drain.

Contract:
- ``GET /healthz``: 200 while the process serves, 503 ``bus_unavailable`` once the NATS client
  gave up reconnecting (``NatsBus.gave_up``: only with a finite reconnect budget).
  ``GET /readyz``: 200 when NATS is connected and the gateway is not draining, else 503.
  ``GET /metrics``: Prometheus exposition of ``GatewayMetrics`` (no credential: no id, token
  or payload is ever in it).
  ``GET /agent/v1/connect``: the credential
  (exactly one ``Authorization: Bearer`` header) is verified *before* the upgrade;
  missing/repeated/invalid -> 401, revoked ->
  403, draining or NATS down -> 503, all with ``{"error": {"code", "message"}}`` and no socket.
  Once verified, the credential is removed from the request websockets keeps for the life of
  the socket. Any other path -> 404.
- Handshake slots: at most ``max_concurrent_handshakes`` upgrades are between their credential
  check and their ``presence.connected`` acknowledgement at once (the others wait, in arrival
  order, within ``open_timeout_s``); a slot is taken before the credential check (a storm's
  thousands of signature checks would otherwise run in one loop turn, and every command to the
  agents already back would wait behind them), given back at once on a refusal, and at the end
  of the set-up, when websockets refuses the upgrade after ``process_request``
  (``process_response`` sees a status other than 101, or a client that went away while in
  line), when the handler ends, and at the latest ``open_timeout_s`` after it was taken. A reconnect
  storm then leaves the loop to the sockets already served (their commands stay fast).
- The process runs on uvloop where installed (``event_loop``); agent sockets negotiate
  permessage-deflate only with ``compression=deflate``.
- Lease (close path 2, docs/design.md "Gateway leases"): ``start`` publishes a first
  ``GatewayHeartbeat`` on ``Subjects.gateway_heartbeat()`` before it listens, then one every
  ``heartbeat_interval_s``, each publish + flush bounded by ``heartbeat_timeout_s``. This boot
  holds its lease until ``lease_ttl_s`` after sending the last heartbeat NATS confirmed (never
  later than the API can see it expire); readiness, hence every upgrade, requires it. When it
  runs out (NATS down, or the process was paused and woke up: gaps of ``time.monotonic``), the
  gateway assumes the API closed its sessions: ``check_lease`` closes every agent socket with
  ``CloseCode.LEASE_LOST`` (``reconnect`` hint with jitter first), takes a new ``boot_id`` and
  only then beats again, so it never serves a session the API closed.
- Every ``sweep_interval_s`` expired pending requests are answered
  ``CommandFailed{agent_timeout}``.
- The revocation bucket is watched from before the first upgrade is accepted; an update closes
  the agent's live sockets with ``CloseCode.REVOKED``. A revocation that lands between the
  credential check and the hub registration is caught by a re-check right after registration.
- ``gateway.control`` is subscribed from before the first upgrade too: a ``ConnectionTakeover``
  notice goes to the hub, which closes a connection of that agent with a lower
  ``presence.connected`` sequence (``CloseCode.REPLACED``; see ``connection.py``).
- ``Gateway.stop`` (SIGTERM/SIGINT in ``main``) drains: readiness fails, new upgrades get 503,
  every agent gets ``reconnect{delay_ms: jittered}`` then close ``CloseCode.DRAINING``, the
  disconnects are published, all bounded by ``drain_timeout_s``; then the loops end and a last
  ``draining`` heartbeat and the bus close follow, each bounded: ``stop`` never hangs on NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import signal
import sys
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.protocol import State

from gurutunnel_protocol import CloseCode, ErrorCode, ProtocolError, Subjects, new_id
from gurutunnel_protocol.envelope import decode_control, encode
from gurutunnel_protocol.messages import (
    ConnectionTakeover,
    DisconnectReason,
    GatewayHeartbeat,
    GatewayLeaseLost,
    Reconnect,
)

from . import collector
from .auth import (
    AgentIdentity,
    CredentialError,
    CredentialVerifier,
    InvalidCredential,
    RevocationMap,
    bearer_token,
    load_public_key,
    parse_not_before,
)
from .bus import BusError, NatsBus
from .config import GatewaySettings
from .connection import AgentConnection, ConnectionDeps
from .hub import Hub
from .metrics import GatewayMetrics

log = logging.getLogger("gurutunnel_gateway")

CONNECT_PATH = "/agent/v1/connect"


def _json_response(
    connection: ServerConnection, status: HTTPStatus, body: dict[str, Any]
) -> Response:
    response = connection.respond(status, json.dumps(body))
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


async def _never_upgraded(ws: ServerConnection) -> None:
    """The operations port answers every request in ``process_request``; never reached."""
    await ws.close(CloseCode.PROTOCOL_ERROR, "no WebSocket here")


def _peer(ws: ServerConnection) -> str | None:
    """``host:port`` of the agent's end of the socket (a function of its own: the handler's
    frame keeps no address tuple for the connection's life)."""
    remote = ws.remote_address
    return f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) else None


def _error(
    connection: ServerConnection, status: HTTPStatus, code: ErrorCode, message: str
) -> Response:
    return _json_response(connection, status, {"error": {"code": code.value, "message": message}})


class _HandshakeSlot:
    """One of ``max_concurrent_handshakes`` permits; released once (idempotent).

    Released once the connection's ``presence.connected`` is acknowledged (or given up), when
    the upgrade is refused, when the handler ends, and at the latest ``open_timeout_s`` after
    it was taken: a handshake that fails after ``process_request`` (the client went away
    before the 101) never reaches the handler, and its slot must not leak."""

    __slots__ = ("_released", "_semaphore", "_timer")

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._released = True  # until acquired
        self._timer: asyncio.TimerHandle | None = None

    async def acquire(self, hold_at_most_s: float) -> None:
        await self._semaphore.acquire()
        self._released = False
        self._timer = asyncio.get_running_loop().call_later(hold_at_most_s, self.release)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None  # the connection keeps its slot: not the cancelled timer too
        self._semaphore.release()


class Gateway:
    """One gateway replica: bus, hub, WebSocket server and background loops."""

    def __init__(self, settings: GatewaySettings, *, bus: NatsBus | None = None) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self.gateway_id = settings.gateway_id
        self.boot_id = new_id()
        self.hub = Hub()
        self.metrics = GatewayMetrics(self.hub)
        self.revocations = RevocationMap()
        self.verifier = CredentialVerifier(
            load_public_key(settings.public_key_pem()), self.revocations
        )
        self.bus: NatsBus = bus or NatsBus(
            settings, self.subjects, on_reconnected=self.metrics.nats_reconnected
        )
        self.draining = False
        self._identities: weakref.WeakKeyDictionary[ServerConnection, AgentIdentity] = (
            weakref.WeakKeyDictionary()
        )
        self._handshakes = asyncio.Semaphore(settings.max_concurrent_handshakes)
        self._slots: weakref.WeakKeyDictionary[ServerConnection, _HandshakeSlot] = (
            weakref.WeakKeyDictionary()
        )
        self._server: Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lease_until: float | None = None
        self._ops_server: Server | None = None
        self._beat_now = asyncio.Event()
        """``time.monotonic()`` when this boot's lease runs out; None: no lease (yet)."""
        self._stopping = False
        self._last_arrival: float | None = None
        """``time.monotonic()`` of the last agent socket handed to ``_handle`` (``collector``)."""
        self._sockets_ended = 0
        """Agent sockets whose handler ended (``collector``: deep collections after churn)."""
        self._deps = ConnectionDeps(
            settings=settings,
            subjects=self.subjects,
            bus=self.bus,
            hub=self.hub,
            gateway_id=self.gateway_id,
            boot_id=self.boot_id,
            metrics=self.metrics,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def metrics_port(self) -> int | None:
        """The bound operations port when ``metrics_port`` is set (useful with 0)."""
        if self._ops_server is None:
            return None
        port: int = self._ops_server.sockets[0].getsockname()[1]
        return port

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``)."""
        assert self._server is not None, "gateway not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def ready(self) -> bool:
        return self.bus.connected and not self.draining and self.lease_held

    @property
    def lease_held(self) -> bool:
        """This boot's lease is live (a confirmed heartbeat less than ``lease_ttl_s`` ago)."""
        return self._lease_until is not None and time.monotonic() < self._lease_until

    async def start(self) -> None:
        """Connect the bus, load revocations, then listen. Raises ``BusError`` if NATS fails."""
        s = self.settings
        await self.bus.connect()
        await self.bus.ensure_presence_stream()
        await self.bus.watch_revocations(
            self._on_revocation, snapshot_timeout_s=s.revocation_snapshot_timeout_s
        )
        # before the first upgrade: a connection accepted here must hear every later notice
        await self.bus.subscribe(self.subjects.gateway_control(), self._on_control)
        # the lease first: readiness needs it, and the API knows this boot before any agent
        await self._beat_once()
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            process_response=self._process_response,
            max_size=s.max_frame_bytes,
            open_timeout=s.open_timeout_s,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            close_timeout=s.close_timeout_s,
            server_header=None,
            backlog=s.listen_backlog,
            compression="deflate" if s.compression == "deflate" else None,
        )
        if s.metrics_port is not None:
            self._ops_server = await serve(
                _never_upgraded,
                s.host,
                s.metrics_port,
                process_request=self._process_ops_request,
                server_header=None,
            )
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="gateway-lease"),
            asyncio.create_task(self._sweep_loop(), name="gateway-sweep"),
        ]
        if collector.installed() and s.gc_full_interval_s > 0:
            collections = collector.FullCollections(
                interval_s=s.gc_full_interval_s,
                quiet_s=s.gc_quiet_s,
                deep_every=s.gc_deep_every,
                last_arrival=lambda: self._last_arrival,
                sockets=lambda: (self._sockets_ended, self.hub.agent_count),
                on_collection=lambda c: self.metrics.gc_collection(deep=c.deep, seconds=c.seconds),
            )
            self._tasks.append(asyncio.create_task(collections.run(), name="gateway-gc"))
        log.info(
            "gateway listening",
            extra={"gateway_id": self.gateway_id, "boot_id": self.boot_id, "port": self.port},
        )

    async def stop(self) -> None:
        """Drain (bounded by ``drain_timeout_s``) and release everything; idempotent."""
        s = self.settings
        self.draining = True
        if self._server is not None:
            # stop accepting; the open sockets are closed below, with a reconnect hint first
            self._server.close(close_connections=False)
            for conn in self.hub.live():
                conn.close(
                    CloseCode.DRAINING,
                    DisconnectReason.SHUTDOWN,
                    "gateway draining",
                    final=Reconnect(delay_ms=self._drain_delay_ms(), reason="draining"),
                )
            try:
                await asyncio.wait_for(self._server.wait_closed(), s.drain_timeout_s)
            except TimeoutError:
                log.error("drain timed out; exiting with connections still open")
            self._server = None
        await self._end_loops()
        if self.bus.connected:
            # one last lease beat says "draining" so the API stops routing here at once (bounded)
            await self._beat_once()
        try:
            await asyncio.wait_for(self.bus.close(), s.publish_timeout_s + s.close_timeout_s)
        except Exception as exc:
            # nats-py may turn the timeout's cancel into its own error: either way, go on
            log.error("bus close did not finish: %s", type(exc).__name__)
        if self._ops_server is not None:
            # last: probes and metrics answered (readiness 503) all through the drain
            self._ops_server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ops_server.wait_closed(), s.close_timeout_s)
            self._ops_server = None

    async def _end_loops(self) -> None:
        """Cancel the background loops and wait for them, at most ``close_timeout_s``."""
        self._stopping = True  # a loop whose cancel was swallowed still ends (see _lease_loop)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=self.settings.close_timeout_s)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("background loop failed: %r", task.exception())
        if pending:
            log.error("background loops still running after cancel; stop goes on")

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ HTTP edge

    def _ops_response(self, connection: ServerConnection, request: Request) -> Response | None:
        """``/healthz``, ``/readyz`` and ``/metrics``; None for any other path."""
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            if self.bus.gave_up:
                # readiness alone only takes the pod out of the Service: let liveness restart it
                return _error(
                    connection,
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    ErrorCode.BUS_UNAVAILABLE,
                    "NATS connection closed for good (reconnect budget spent); restart me",
                )
            return _json_response(connection, HTTPStatus.OK, {"status": "alive"})
        if path == "/metrics" and (
            self.settings.metrics_port is None or connection.server is self._ops_server
        ):
            # no credential: ids never reach a label (see metrics.py); with metrics_port set it
            # is served only there, off the agent port a load balancer exposes
            accept = ",".join(request.headers.get_all("Accept"))
            body, content_type = self.metrics.render(accept)
            response = connection.respond(HTTPStatus.OK, body.decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = content_type
            return response
        if path == "/readyz":
            if self.ready:
                return _json_response(connection, HTTPStatus.OK, {"status": "ready"})
            detail = "draining" if self.draining else "bus unavailable"
            return _error(
                connection, HTTPStatus.SERVICE_UNAVAILABLE, ErrorCode.SERVICE_UNAVAILABLE, detail
            )
        return None

    async def _process_ops_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """The operations port (``metrics_port``): probes and metrics, never an upgrade."""
        response = self._ops_response(connection, request)
        if response is None:
            return _error(connection, HTTPStatus.NOT_FOUND, ErrorCode.NOT_FOUND, "no such path")
        return response

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.split("?", 1)[0]
        ops = self._ops_response(connection, request)
        if ops is not None:
            return ops
        if path != CONNECT_PATH:
            return _error(connection, HTTPStatus.NOT_FOUND, ErrorCode.NOT_FOUND, "no such path")
        if not self.ready:
            self.metrics.upgrade_refused(HTTPStatus.SERVICE_UNAVAILABLE)
            return _error(
                connection,
                HTTPStatus.SERVICE_UNAVAILABLE,
                ErrorCode.SERVICE_UNAVAILABLE,
                "gateway draining or bus unavailable; reconnect elsewhere",
            )
        # A handshake slot from here until presence.connected is acknowledged: in a reconnect
        # storm the sockets already served keep getting the loop (``max_concurrent_handshakes``);
        # the others wait here, in arrival order, before their credential check (CPU that
        # thousands of upgrades in one loop turn would take from everyone). A refusal gives it
        # back at once: a bad credential never holds a slot past its own check.
        slot = _HandshakeSlot(self._handshakes)
        await slot.acquire(self.settings.open_timeout_s)
        try:
            # get() would raise MultipleValuesError (HTTP 500) on a repeated header
            values = request.headers.get_all("Authorization")
            if len(values) > 1:
                raise InvalidCredential("exactly one Authorization header is allowed")
            identity = self.verifier.verify(bearer_token(values[0] if values else None))
        except CredentialError as exc:
            slot.release()
            log.info(
                "agent refused at upgrade",
                extra={"status": exc.status, "code": exc.code.value, "reason": exc.message},
            )
            self.metrics.upgrade_refused(exc.status)
            return _error(connection, HTTPStatus(exc.status), exc.code, exc.message)
        except BaseException:
            slot.release()
            raise
        # websockets keeps the request for the connection's life: the credential is not kept
        # with it (verified, it is not needed again, and nothing can leak it from there)
        del request.headers["Authorization"]
        self._identities[connection] = identity
        self._slots[connection] = slot
        self.metrics.upgrade_accepted()
        return None  # proceed with the upgrade

    def _process_response(
        self, connection: ServerConnection, _request: Request, response: Response
    ) -> None:
        """websockets may still refuse an upgrade after ``process_request`` (a bad
        ``Sec-WebSocket-Key`` or version: 400), and it sends nothing to a client that went away
        meanwhile (one that gave up while waiting for a slot: the connection is no longer
        ``CONNECTING``); the handler then never runs, so give the slot back here rather than
        after ``open_timeout_s`` (in a storm, agents that time out in line would otherwise hold
        every slot that long, and admissions would stop). The 503 websockets sends while the
        server closes is decided after this hook: that slot is never given back, which no
        longer matters in a server that stops."""
        if (
            response.status_code != HTTPStatus.SWITCHING_PROTOCOLS
            or connection.state is not State.CONNECTING
        ):
            self._identities.pop(connection, None)
            slot = self._slots.pop(connection, None)
            if slot is not None:
                slot.release()

    async def _handle(self, ws: ServerConnection) -> None:
        self._last_arrival = time.monotonic()
        identity = self._identities.pop(ws, None)
        slot = self._slots.pop(ws, None)
        try:
            if identity is None:  # cannot happen: process_request ran first
                await ws.close(CloseCode.UNAUTHORIZED, "unauthenticated")
                return
            conn = AgentConnection(ws, identity, self._deps, remote_addr=_peer(ws))
            if self.draining:
                return
            await conn.run(admitted=self._admit, set_up=None if slot is None else slot.release)
        finally:
            self._sockets_ended += 1
            if slot is not None:
                slot.release()

    def _admit(self, conn: AgentConnection) -> None:
        """Last checks once ``conn`` is in the hub, for what happened since the upgrade."""
        if self.revocations.is_revoked(conn.agent_id, conn.identity.issued_at):
            # revoked between verify() and registration: hub.revoke() did not see it
            log.info("agent revoked while connecting", extra={"agent_id": conn.agent_id})
            conn.close(CloseCode.REVOKED, DisconnectReason.REVOKED, "agent revoked")
        elif conn.boot_id != self.boot_id or not self.lease_held:
            # the lease ran out (or was fenced) while this connection was subscribing:
            # _fence did not see it, and it must not serve sessions under a lost boot
            conn.close(
                CloseCode.LEASE_LOST,
                DisconnectReason.LEASE_LOST,
                "gateway lease lost",
                final=Reconnect(delay_ms=self._drain_delay_ms(), reason="lease_lost"),
            )
        elif self.draining:
            # stop() began while this connection subscribed: hub.live() did not list it
            conn.close(
                CloseCode.DRAINING,
                DisconnectReason.SHUTDOWN,
                "gateway draining",
                final=Reconnect(delay_ms=self._drain_delay_ms(), reason="draining"),
            )

    def _drain_delay_ms(self) -> int:
        return int(random.uniform(0, self.settings.reconnect_jitter_max_s) * 1000)

    async def _on_control(self, payload: bytes, reply: str | None) -> None:
        """``gateway.control``: takeover notices (revocations come from the KV bucket)."""
        try:
            message = decode_control(payload, self.settings.max_frame_bytes)
        except ProtocolError as exc:
            log.warning("control message refused: %s", exc.message, extra={"code": exc.code})
            return
        if isinstance(message, GatewayLeaseLost):
            if (message.gateway_id, message.boot_id) == (self.gateway_id, self.boot_id):
                self._fence("an API declared this boot's lease lost")
            return
        if isinstance(message, ConnectionTakeover) and self.hub.takeover(message):
            log.info(
                "agent taken over by a newer connection",
                extra={"agent_id": message.agent_id, "conn_id": message.conn_id},
            )

    # ------------------------------------------------------------------ background

    def _on_revocation(self, agent_id: str, value: bytes | None) -> None:
        if value is None:
            self.revocations.remove(agent_id)
            return
        not_before = parse_not_before(value)
        self.revocations.set(agent_id, not_before)
        closed = self.hub.revoke(agent_id, not_before)
        log.info("agent revoked", extra={"agent_id": agent_id, "closed_connections": closed})

    async def _beat_once(self) -> bool:
        """Publish one lease heartbeat and wait until NATS has it (``heartbeat_timeout_s``).

        Confirmed, this boot holds its lease until ``lease_ttl_s`` after the *send*: the API
        cannot have renewed it earlier. False (logged) when it was not confirmed."""
        s = self.settings
        boot_id, sent_at = self.boot_id, time.monotonic()
        beat = GatewayHeartbeat(
            gateway_id=self.gateway_id,
            boot_id=boot_id,
            at=datetime.now(UTC),
            agents=self.hub.agent_count,
            draining=self.draining,
            lease_ttl_s=s.lease_ttl_s,
        )
        try:
            # wait_for on top of the flush timeout: the publish itself may wait on a full buffer
            await asyncio.wait_for(
                self.bus.publish_flushed(
                    self.subjects.gateway_heartbeat(),
                    encode(beat),
                    timeout_s=s.heartbeat_timeout_s,
                ),
                s.heartbeat_timeout_s,
            )
        except Exception as exc:
            # BusError, the timeout, or a client bug: the lease loop must go on either way
            log.warning("gateway heartbeat not confirmed: %s", str(exc) or type(exc).__name__)
            return False
        # not fenced meanwhile (a lost boot's beat renews nothing), and confirmed while the lease
        # still held: a confirmation that comes after the end may have reached the API after its
        # reaper judged the lease, so it renews nothing and the lease loop fences instead
        held = self._lease_until is None or time.monotonic() < self._lease_until
        if self.boot_id == boot_id and held:
            self._lease_until = sent_at + s.lease_ttl_s
        return True

    def check_lease(self, now: float | None = None) -> bool:
        """Fence this gateway if its lease ran out by ``now`` (``time.monotonic()`` when None):
        close every agent socket ``LEASE_LOST`` and take a new boot id. Whether it fenced."""
        now = time.monotonic() if now is None else now
        if self._lease_until is None or now < self._lease_until:
            return False
        self._fence(f"lease ran out {now - self._lease_until:.1f} s ago (no confirmed heartbeat)")
        return True

    def _fence(self, why: str) -> None:
        """Drop the current boot: close every agent socket ``LEASE_LOST``, take a new boot id
        (its first confirmed heartbeat starts a fresh lease) and beat at once."""
        lost_boot = self.boot_id
        self.boot_id = new_id()
        self._lease_until = None
        # connections accepted from now on are stamped with the new boot
        self._deps = dataclasses.replace(self._deps, boot_id=self.boot_id)
        closed = 0
        for conn in self.hub.live():
            conn.close(
                CloseCode.LEASE_LOST,
                DisconnectReason.LEASE_LOST,
                "gateway lease lost",
                final=Reconnect(delay_ms=self._drain_delay_ms(), reason="lease_lost"),
            )
            closed += 1
        self.metrics.lease_lost()
        self._beat_now.set()
        log.error(
            "lease lost: %s; agent sockets closed, new boot %s",
            why,
            self.boot_id,
            extra={"gateway_id": self.gateway_id, "boot_id": lost_boot, "count": closed},
        )

    def _loops_stopping(self) -> bool:
        # not cancellation alone: nats-py may turn a CancelledError into its own error, and
        # wait_for can swallow a cancel on Python 3.11
        task = asyncio.current_task()
        return self._stopping or (task is not None and task.cancelling() > 0)

    async def _lease_loop(self) -> None:
        """Beat every ``heartbeat_interval_s``; wake at the lease's end too, to fence in time."""
        s = self.settings
        next_beat = time.monotonic() + s.heartbeat_interval_s  # start() sent the first beat
        while not self._loops_stopping():
            now = time.monotonic()
            if self.check_lease(now):
                next_beat = now  # the new boot beats at once
            if now >= next_beat:
                next_beat = now + s.heartbeat_interval_s
                await self._beat_once()
                continue  # a beat may take a while: look at the lease again first
            wake = next_beat if self._lease_until is None else min(next_beat, self._lease_until)
            with contextlib.suppress(TimeoutError):
                # a fence ordered from outside (``GatewayLeaseLost``) beats the new boot at once
                await asyncio.wait_for(self._beat_now.wait(), max(0.0, wake - time.monotonic()))
            if self._beat_now.is_set():
                self._beat_now.clear()
                next_beat = time.monotonic()

    async def _sweep_loop(self) -> None:
        while not self._loops_stopping():
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                expired = await self.hub.sweep(time.monotonic())
            except Exception:
                # one failed sweep must not end them: unanswered requests would wait forever
                log.exception("pending-request sweep failed")
                continue
            if expired:
                log.info("expired pending requests answered", extra={"count": expired})


# ---------------------------------------------------------------------- process entry point

_LOG_FIELDS = (
    "agent_id",
    "conn_id",
    "session_id",
    "gateway_id",
    "boot_id",
    "port",
    "status",
    "code",
    "reason",
    "close_code",
    "event",
    "count",
    "closed_connections",
    "frame_type",
    "subject",
    "req_id",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the known context fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _LOG_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets' own handshake logging stays at warnings: never request headers in logs
    logging.getLogger("websockets").setLevel(logging.WARNING)


async def run(settings: GatewaySettings) -> None:
    """Run a gateway until SIGTERM or SIGINT, then drain and return."""
    gateway = Gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    try:
        await stop.wait()
        log.info("signal received; draining")
    finally:
        await gateway.stop()
    log.info("gateway stopped")


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop ``main`` runs on: uvloop for ``auto`` where it is installed (not on Windows),
    None (asyncio's own loop) for ``asyncio`` or when uvloop is missing; ``uvloop`` demands it.

    uvloop's loop and transports are C: much of the gateway's work per frame is loop and
    transport overhead around small messages."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main() -> None:
    """``gurutunnel-gateway``: settings from ``GT_GATEWAY_*``; exit 1 on a startup failure."""
    try:
        settings = GatewaySettings()
    except ValueError as exc:
        print(f"gurutunnel-gateway: invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    collector.install(settings.gc_full_interval_s)
    loop_factory = event_loop_factory(settings.event_loop)
    log.info(
        "event loop: %s",
        "asyncio" if loop_factory is None else loop_factory.__module__.split(".")[0],
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(settings))
    except BusError as exc:
        log.error("bus unavailable at startup: %s", exc)
        raise SystemExit(1) from None
    except (OSError, ValueError) as exc:
        log.error("startup failed: %s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
