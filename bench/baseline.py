"""The raw stack the benchmarks compare gurutunnel to, each part as small as honest.

``python -m bench.baseline MODE ...`` runs one of:

- ``gw PORT NATS_URL``: the naive bridge's gateway. A websockets server (the gateway's socket
  settings: 1 MiB frames, 10 s pings, no compression) where a peer connects on
  ``/peer/<name>``; it subscribes
  ``bench.bridge.<name>.req`` and forwards each request to the peer, and the peer's answer back
  as the NATS reply. Stream frames of the peer are published on ``bench.bridge.<name>.up`` as
  they are. No authentication, no JSON, no validation, no sequence numbers, no presence.
- ``api PORT NATS_URL``: the naive bridge's API, a bare ASGI app under uvicorn (as the real API
  runs): ``POST /request/<name>`` sends its body as a NATS request and answers the reply;
  WebSocket ``/stream/<name>`` subscribes ``bench.bridge.<name>.up``, forwards every message
  to the client and sends each client message as a request (the start of a stream).
- ``peer BRIDGE_WS_URL NAME...``: the minimal agent side, one socket per name. It answers
  ``echo`` with ``ok\\n``, ``open``/``close`` with ``ready``/``closed``, and
  ``stream TOTAL CHUNK`` with ``started`` and then TOTAL bytes in CHUNK-byte frames as fast as
  the socket takes them, then an end frame; ``cancel`` stops its streams.
- ``bare PORT``: a bare websockets server that accepts sockets and holds them (same socket
  settings as the gateway); the baseline for memory per connection and the reconnect storm.

Both servers (``gw``, ``bare``) run on the gateway's default event loop (uvloop where installed)
with its default listen backlog; the bridge's API runs under uvicorn with uvicorn's defaults, as
the real API does.

Peer <-> gateway frames are binary: 1 byte kind (1 request, 2 reply, 3 data, 4 end) and a
4-byte request number (requests and replies). The ``up`` messages keep the kind byte, so a
reader sees where a stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gurutunnel_gateway.config import GatewaySettings
from gurutunnel_gateway.server import event_loop_factory

from .simagent import pattern_bytes, raise_nofile_limit

REQUEST, REPLY, DATA, END = 1, 2, 3, 4
MAX_FRAME_BYTES = 1 << 20
PING_INTERVAL_S = 10.0
PING_TIMEOUT_S = 10.0
COMPRESSION = None
"""The gateway's default (``GT_GATEWAY_COMPRESSION=none``): peers offer permessage-deflate like
the real agent, and the server declines it, as the gateway does."""
_HEAD = struct.Struct("!BI")

# The servers (bridge gateway, bare server) run on the gateway's default event loop (uvloop
# where installed) with its default listen backlog: the same loop and the same kernel queue of
# pending connections, so a ratio measures the gateway's code, not a configuration choice.
LISTEN_BACKLOG: int = GatewaySettings.model_fields["listen_backlog"].default
SERVER_LOOP = event_loop_factory(GatewaySettings.model_fields["event_loop"].default)


def req_subject(name: str) -> str:
    return f"bench.bridge.{name}.req"


def up_subject(name: str) -> str:
    return f"bench.bridge.{name}.up"


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# ------------------------------------------------------------------------------ bridge gateway
async def run_gw(port: int, nats_url: str) -> None:
    nc = await nats.connect(nats_url)

    async def handler(ws: ServerConnection) -> None:
        name = ws.request.path.rsplit("/", 1)[-1] if ws.request is not None else "?"
        pending: dict[int, str] = {}
        counter = 0

        async def on_request(msg: Any) -> None:
            nonlocal counter
            counter += 1
            pending[counter] = msg.reply
            with contextlib.suppress(ConnectionClosed):
                await ws.send(_HEAD.pack(REQUEST, counter) + msg.data)

        sub = await nc.subscribe(req_subject(name), cb=on_request)
        up = up_subject(name)
        try:
            async for frame in ws:
                if not isinstance(frame, bytes) or not frame:
                    continue
                if frame[0] == REPLY:
                    _, number = _HEAD.unpack_from(frame)
                    reply = pending.pop(number, None)
                    if reply:
                        await nc.publish(reply, frame[_HEAD.size :])
                else:
                    await nc.publish(up, frame)
        except ConnectionClosed:
            pass
        finally:
            await sub.unsubscribe()

    async with serve(
        handler,
        "127.0.0.1",
        port,
        max_size=MAX_FRAME_BYTES,
        ping_interval=PING_INTERVAL_S,
        ping_timeout=PING_TIMEOUT_S,
        compression=COMPRESSION,
        backlog=LISTEN_BACKLOG,
    ):
        print("ready", flush=True)
        await _until_signal()
    await nc.close()


# ------------------------------------------------------------------------------ bridge API
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def make_api(nats_url: str) -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """The bare ASGI app of the bridge's API (see the module contract)."""
    state: dict[str, Any] = {}

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["nc"] = await nats.connect(nats_url)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await state["nc"].close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        name = scope["path"].rsplit("/", 1)[-1]
        try:
            reply = await state["nc"].request(req_subject(name), body, timeout=10)
            status, data = 200, reply.data
        except Exception:
            status, data = 504, b"no answer"
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": data})

    async def websocket(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        name = scope["path"].rsplit("/", 1)[-1]
        nc = state["nc"]

        async def forward(msg: Any) -> None:
            with contextlib.suppress(Exception):
                await send({"type": "websocket.send", "bytes": msg.data})

        sub = await nc.subscribe(up_subject(name), cb=forward)
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes") or (message.get("text") or "").encode()
                with contextlib.suppress(Exception):
                    await nc.request(req_subject(name), data, timeout=10)
        finally:
            await sub.unsubscribe()

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http":
            await http(scope, receive, send)
        elif scope["type"] == "websocket":
            await websocket(scope, receive, send)

    return app


def run_api(port: int, nats_url: str) -> None:
    import uvicorn

    print("ready", flush=True)
    uvicorn.run(
        make_api(nats_url),
        host="127.0.0.1",
        port=port,
        access_log=False,
        log_level="warning",
        lifespan="on",
    )


# ------------------------------------------------------------------------------ peer
class Peer:
    """The agent side of one bridge socket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.streams: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        async for frame in self.ws:
            if not isinstance(frame, bytes) or not frame or frame[0] != REQUEST:
                continue
            _, number = _HEAD.unpack_from(frame)
            words = frame[_HEAD.size :].split()
            verb = words[0] if words else b""
            answer = {b"echo": b"ok\n", b"open": b"ready", b"close": b"closed"}.get(verb)
            if verb == b"stream":
                answer = b"started"
                task = asyncio.create_task(self._stream(int(words[1]), int(words[2])))
                self.streams.add(task)
                task.add_done_callback(self.streams.discard)
            elif verb == b"cancel":
                answer = b"cancelled"
                for task in list(self.streams):
                    task.cancel()
            await self.ws.send(_HEAD.pack(REPLY, number) + (answer or b"unknown"))

    async def _stream(self, total: int, chunk: int) -> None:
        payloads = [bytes([DATA]) + pattern_bytes(i * 7919, chunk) for i in range(8)]
        sent = 0
        with contextlib.suppress(asyncio.CancelledError):
            while sent < total:
                size = min(chunk, total - sent)
                frame = payloads[(sent // chunk) % 8]
                await self.ws.send(frame if size == chunk else frame[: size + 1])
                sent += size
                await asyncio.sleep(0)  # as the simulated agent does (see bench.simagent)
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(bytes([END]))


async def run_peer(url: str, names: list[str]) -> None:
    async def one(name: str) -> None:
        async with connect(
            f"{url}/peer/{name}",
            max_size=MAX_FRAME_BYTES,
            ping_interval=20,
            ping_timeout=20,
        ) as ws:
            await Peer(ws).serve()

    tasks = [asyncio.create_task(one(name)) for name in names]
    print("ready", flush=True)
    stop = asyncio.create_task(_until_signal())
    await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


# ------------------------------------------------------------------------------ bare server
async def run_bare(port: int) -> None:
    async def hold(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(
        hold,
        "127.0.0.1",
        port,
        max_size=MAX_FRAME_BYTES,
        ping_interval=PING_INTERVAL_S,
        ping_timeout=PING_TIMEOUT_S,
        compression=COMPRESSION,
        backlog=LISTEN_BACKLOG,
    ):
        print("ready", flush=True)
        await _until_signal()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    raise_nofile_limit()
    mode = args[0] if args else ""
    if mode == "gw":
        with asyncio.Runner(loop_factory=SERVER_LOOP) as runner:
            runner.run(run_gw(int(args[1]), args[2]))
    elif mode == "api":
        run_api(int(args[1]), args[2])
    elif mode == "peer":
        asyncio.run(run_peer(args[1], args[2:]))
    elif mode == "bare":
        with asyncio.Runner(loop_factory=SERVER_LOOP) as runner:
            runner.run(run_bare(int(args[1])))
    else:
        sys.exit("usage: python -m bench.baseline gw|api|peer|bare ...")


if __name__ == "__main__":
    main()
