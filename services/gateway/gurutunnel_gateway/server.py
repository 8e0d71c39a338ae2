"""The gateway process: accept agent sockets (auth before upgrade), health, lease, drain.

Contract:
- ``GET /healthz``: 200 while the process serves. ``GET /readyz``: 200 when NATS is connected and
  the gateway is not draining, else 503. ``GET /agent/v1/connect``: the credential
  (exactly one ``Authorization: Bearer`` header) is verified *before* the upgrade;
  missing/repeated/invalid -> 401, revoked ->
  403, draining or NATS down -> 503, all with ``{"error": {"code", "message"}}`` and no socket.
  Any other path -> 404.
- Every ``heartbeat_interval_s`` a ``GatewayHeartbeat`` (the lease) goes to
  ``Subjects.gateway_heartbeat()``; every ``sweep_interval_s`` expired pending requests are
  answered ``CommandFailed{agent_timeout}``.
- The revocation bucket is watched from before the first upgrade is accepted; an update closes
  the agent's live sockets with ``CloseCode.REVOKED``. A revocation that lands between the
  credential check and the hub registration is caught by a re-check right after registration.
- ``Gateway.stop`` (SIGTERM/SIGINT in ``main``) drains: readiness fails, new upgrades get 503,
  every agent gets ``reconnect{delay_ms: jittered}`` then close ``CloseCode.DRAINING``, the
  disconnects are published, all bounded by ``drain_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import time
import weakref
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from gurutunnel_protocol import CloseCode, ErrorCode, Subjects, new_id
from gurutunnel_protocol.envelope import encode
from gurutunnel_protocol.messages import DisconnectReason, GatewayHeartbeat, Reconnect

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

log = logging.getLogger("gurutunnel_gateway")

CONNECT_PATH = "/agent/v1/connect"


def _json_response(
    connection: ServerConnection, status: HTTPStatus, body: dict[str, Any]
) -> Response:
    response = connection.respond(status, json.dumps(body))
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def _error(
    connection: ServerConnection, status: HTTPStatus, code: ErrorCode, message: str
) -> Response:
    return _json_response(connection, status, {"error": {"code": code.value, "message": message}})


class Gateway:
    """One gateway replica: bus, hub, WebSocket server and background loops."""

    def __init__(self, settings: GatewaySettings, *, bus: NatsBus | None = None) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self.gateway_id = settings.gateway_id
        self.boot_id = new_id()
        self.hub = Hub()
        self.revocations = RevocationMap()
        self.verifier = CredentialVerifier(
            load_public_key(settings.public_key_pem()), self.revocations
        )
        self.bus: NatsBus = bus or NatsBus(settings, self.subjects)
        self.draining = False
        self._identities: weakref.WeakKeyDictionary[ServerConnection, AgentIdentity] = (
            weakref.WeakKeyDictionary()
        )
        self._server: Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._deps = ConnectionDeps(
            settings=settings,
            subjects=self.subjects,
            bus=self.bus,
            hub=self.hub,
            gateway_id=self.gateway_id,
            boot_id=self.boot_id,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``)."""
        assert self._server is not None, "gateway not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def ready(self) -> bool:
        return self.bus.connected and not self.draining

    async def start(self) -> None:
        """Connect the bus, load revocations, then listen. Raises ``BusError`` if NATS fails."""
        s = self.settings
        await self.bus.connect()
        await self.bus.ensure_presence_stream()
        await self.bus.watch_revocations(
            self._on_revocation, snapshot_timeout_s=s.revocation_snapshot_timeout_s
        )
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            max_size=s.max_frame_bytes,
            open_timeout=s.open_timeout_s,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            close_timeout=s.close_timeout_s,
            server_header=None,
        )
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="gateway-lease"),
            asyncio.create_task(self._sweep_loop(), name="gateway-sweep"),
        ]
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
        # one last lease beat says "draining" so the API stops routing here at once
        with contextlib.suppress(BusError):
            await self._beat()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.bus.close()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ HTTP edge

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return _json_response(connection, HTTPStatus.OK, {"status": "alive"})
        if path == "/readyz":
            if self.ready:
                return _json_response(connection, HTTPStatus.OK, {"status": "ready"})
            detail = "draining" if self.draining else "bus unavailable"
            return _error(
                connection, HTTPStatus.SERVICE_UNAVAILABLE, ErrorCode.SERVICE_UNAVAILABLE, detail
            )
        if path != CONNECT_PATH:
            return _error(connection, HTTPStatus.NOT_FOUND, ErrorCode.NOT_FOUND, "no such path")
        if not self.ready:
            return _error(
                connection,
                HTTPStatus.SERVICE_UNAVAILABLE,
                ErrorCode.SERVICE_UNAVAILABLE,
                "gateway draining or bus unavailable; reconnect elsewhere",
            )
        try:
            # get() would raise MultipleValuesError (HTTP 500) on a repeated header
            values = request.headers.get_all("Authorization")
            if len(values) > 1:
                raise InvalidCredential("exactly one Authorization header is allowed")
            identity = self.verifier.verify(bearer_token(values[0] if values else None))
        except CredentialError as exc:
            log.info(
                "agent refused at upgrade",
                extra={"status": exc.status, "code": exc.code.value, "reason": exc.message},
            )
            return _error(connection, HTTPStatus(exc.status), exc.code, exc.message)
        self._identities[connection] = identity
        return None  # proceed with the upgrade

    async def _handle(self, ws: ServerConnection) -> None:
        identity = self._identities.pop(ws, None)
        if identity is None:  # cannot happen: process_request ran first
            await ws.close(CloseCode.UNAUTHORIZED, "unauthenticated")
            return
        remote = ws.remote_address
        remote_addr = f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) else None
        conn = AgentConnection(ws, identity, self._deps, remote_addr=remote_addr)
        if self.draining:
            return
        await conn.run(admitted=self._admit)

    def _admit(self, conn: AgentConnection) -> None:
        """Last checks once ``conn`` is in the hub, for what happened since the upgrade."""
        if self.revocations.is_revoked(conn.agent_id, conn.identity.issued_at):
            # revoked between verify() and registration: hub.revoke() did not see it
            log.info("agent revoked while connecting", extra={"agent_id": conn.agent_id})
            conn.close(CloseCode.REVOKED, DisconnectReason.REVOKED, "agent revoked")
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

    # ------------------------------------------------------------------ background

    def _on_revocation(self, agent_id: str, value: bytes | None) -> None:
        if value is None:
            self.revocations.remove(agent_id)
            return
        not_before = parse_not_before(value)
        self.revocations.set(agent_id, not_before)
        closed = self.hub.revoke(agent_id, not_before)
        log.info("agent revoked", extra={"agent_id": agent_id, "closed_connections": closed})

    async def _beat(self) -> None:
        beat = GatewayHeartbeat(
            gateway_id=self.gateway_id,
            boot_id=self.boot_id,
            at=datetime.now(UTC),
            agents=self.hub.agent_count,
            draining=self.draining,
            lease_ttl_s=self.settings.lease_ttl_s,
        )
        await self.bus.publish(self.subjects.gateway_heartbeat(), encode(beat))

    async def _lease_loop(self) -> None:
        while True:
            try:
                await self._beat()
            except BusError as exc:
                log.warning("gateway heartbeat not published: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            expired = await self.hub.sweep(time.monotonic())
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


def main() -> None:
    """``gurutunnel-gateway``: settings from ``GT_GATEWAY_*``; exit 1 on a startup failure."""
    try:
        settings = GatewaySettings()
    except ValueError as exc:
        print(f"gurutunnel-gateway: invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    try:
        asyncio.run(run(settings))
    except BusError as exc:
        log.error("bus unavailable at startup: %s", exc)
        raise SystemExit(1) from None
    except (OSError, ValueError) as exc:
        log.error("startup failed: %s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
