"""A small real ``websockets`` server that plays the gateway for the agent's integration tests.

It checks the ``Authorization`` header at the upgrade (401 with the documented JSON error body
otherwise), sends ``welcome`` (unless told not to), records every frame the agent sends and how
each connection ended, and lets a test send frames or close a connection with any code.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gurutunnel_protocol.envelope import decode_agent_to_server, encode_text
from gurutunnel_protocol.messages import AgentToServer, ServerToAgent, Welcome

GOOD_CREDENTIAL = "good-credential.for-tests"
F = TypeVar("F")


@dataclass
class Received:
    conn: ServerConnection
    frame: AgentToServer
    at: float


@dataclass
class FakeGateway:
    credential: str = GOOD_CREDENTIAL
    refuse_status: int | None = None
    send_welcome: bool = True
    heartbeat_interval_s: float = 0.1
    server: Server | None = None
    url: str = ""
    auth_headers: list[str | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    connections: list[ServerConnection] = field(default_factory=list)
    connected: asyncio.Queue[ServerConnection] = field(default_factory=asyncio.Queue)
    received: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    ended: asyncio.Queue[tuple[ServerConnection, int | None, float]] = field(
        default_factory=asyncio.Queue
    )

    async def start(self) -> None:
        self.server = await serve(
            self._handler, "127.0.0.1", 0, process_request=self._process_request
        )
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/agent/v1/connect"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await asyncio.wait_for(self.server.wait_closed(), 5)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        auth = request.headers.get("Authorization")
        self.auth_headers.append(auth)
        self.paths.append(request.path)
        status = self.refuse_status
        if status is None and auth != f"Bearer {self.credential}":
            status = HTTPStatus.UNAUTHORIZED
        if status is None:
            return None
        code = {401: "unauthorized", 403: "forbidden"}.get(status, "service_unavailable")
        body = json.dumps({"error": {"code": code, "message": "refused by the fake gateway"}})
        response = connection.respond(status, body)
        response.headers["Content-Type"] = "application/json"
        return response

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        if self.send_welcome:
            await ws.send(
                encode_text(
                    Welcome(
                        agent_id="agent1",
                        conn_id=f"conn{len(self.connections)}",
                        gateway_id="gw1",
                        heartbeat_interval_s=self.heartbeat_interval_s,
                    )
                )
            )
        self.connected.put_nowait(ws)
        loop = asyncio.get_running_loop()
        try:
            async for raw in ws:
                self.received.put_nowait(Received(ws, decode_agent_to_server(raw), loop.time()))
        except ConnectionClosed:
            pass
        self.ended.put_nowait((ws, ws.close_code, loop.time()))

    async def send(self, ws: ServerConnection, frame: ServerToAgent) -> None:
        await ws.send(encode_text(frame))

    async def next_connection(self, timeout_s: float = 5.0) -> ServerConnection:
        return await asyncio.wait_for(self.connected.get(), timeout_s)

    async def next_end(self, timeout_s: float = 5.0) -> tuple[ServerConnection, int | None, float]:
        return await asyncio.wait_for(self.ended.get(), timeout_s)

    async def next_frame(self, kind: type[F], timeout_s: float = 5.0) -> tuple[ServerConnection, F]:
        """The next received frame of type ``kind`` (others are skipped), within ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while True:
                item = await self.received.get()
                if isinstance(item.frame, kind):
                    return item.conn, item.frame
