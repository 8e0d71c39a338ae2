"""Output streaming on the technician WebSocket, on the real API (uvicorn) and real NATS: a
technician who stops reading is dropped (1013) as soon as the send queue overflows, not after
``ws_send_timeout_s`` of a stuck send, and the chunk text built without the model is the
model's text."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gurutunnel_api.config import ApiSettings
from gurutunnel_api.work.schemas import WsChunkOut, ws_text
from gurutunnel_api.work.ws import CLOSE_TRY_AGAIN_LATER, chunk_text
from gurutunnel_protocol import new_id
from gurutunnel_protocol.messages import OutputStream, SessionFrame, Terminal, TerminalCancel

from .conftest import Users, chunk, exit_frame, wait_until
from .test_exec import World, WorldFactory, _recv, _scripted

FLOOD_CHUNKS = 600
FLOOD_CHUNK_BYTES = 32 * 1024
"""~26 MB of JSON: more than the kernel's socket buffers of a reader who stopped reading."""


@pytest.fixture
def worlds(
    migrated: ApiSettings, nc: NatsClient, subject_prefix: str, users: Users
) -> WorldFactory:
    return WorldFactory(migrated=migrated, nc=nc, subject_prefix=subject_prefix, users=users)


def _flood(t: Terminal) -> list[SessionFrame]:
    data = os.urandom(FLOOD_CHUNK_BYTES)
    frames: list[SessionFrame] = [chunk(t, i, data) for i in range(FLOOD_CHUNKS)]
    frames.append(exit_frame(t, FLOOD_CHUNKS))
    return frames


async def _read_until_closed(ws: ClientConnection, seqs: list[int]) -> None:
    """Read chunks (their seq into ``seqs``) until the server closes; only chunks and gaps."""
    async with asyncio.timeout(10):
        async for raw in ws:
            message = json.loads(raw)
            assert message["type"] in ("chunk", "gap"), message
            if message["type"] == "chunk":
                seqs.append(message["seq"])


def _cancelled(w: World, channel_id: str) -> Callable[[], Any]:
    async def seen() -> bool:
        return any(isinstance(f, TerminalCancel) and f.channel_id == channel_id for f in w.gw.down)

    return seen


async def test_reader_who_stops_reading_is_dropped_at_the_overflow_not_after_the_send_timeout(
    worlds: WorldFactory,
) -> None:
    """The writer is stuck in a send the technician never reads; the overflow alone ends the
    socket: the command is cancelled on the agent long before ``ws_send_timeout_s``, and the
    reader, once it reads again, gets chunks in order and then 1013 (no silent loss)."""
    send_timeout_s = 30.0
    async with worlds(ws_send_queue_max_bytes=64 * 1024, ws_send_timeout_s=send_timeout_s) as world:
        world.gw.on_terminal = await _scripted(_flood)
        # max_queue=1: the client library stops reading the socket at once
        async with connect(
            world.live.ws_url(world.session_id, await world.ticket()),
            open_timeout=5,
            max_queue=1,
            max_size=None,
        ) as ws:
            t0 = time.monotonic()
            await ws.send(json.dumps({"type": "exec", "argv": ["x"], "timeout_s": 60}))
            started = await _recv(ws, "started")
            await wait_until(
                _cancelled(world, started["channel_id"]),
                timeout_s=send_timeout_s / 3,
                what="terminal.cancel after the overflow",
            )
            assert time.monotonic() - t0 < send_timeout_s / 3
            seqs: list[int] = []
            with pytest.raises(ConnectionClosed) as info:
                await _read_until_closed(ws, seqs)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == CLOSE_TRY_AGAIN_LATER
            assert seqs == list(range(len(seqs)))
            assert len(seqs) < FLOOD_CHUNKS


async def test_reader_who_keeps_up_gets_every_chunk_of_a_flood_in_order(
    worlds: WorldFactory,
) -> None:
    async with worlds() as world:
        world.gw.on_terminal = await _scripted(_flood)
        async with connect(
            world.live.ws_url(world.session_id, await world.ticket()),
            open_timeout=5,
            max_size=None,
        ) as ws:
            await ws.send(json.dumps({"type": "exec", "argv": ["x"], "timeout_s": 60}))
            await _recv(ws, "started")
            seqs: list[int] = []
            async with asyncio.timeout(30):
                async for raw in ws:
                    message = json.loads(raw)
                    if message["type"] == "exit":
                        break
                    assert message["type"] == "chunk", message
                    seqs.append(message["seq"])
            assert seqs == list(range(FLOOD_CHUNKS))


@pytest.mark.parametrize("stream", list(OutputStream))
@pytest.mark.parametrize("data", [b"", b'\x00\xff\n"\\', os.urandom(4096)])
async def test_chunk_text_is_the_text_of_the_chunk_model(stream: OutputStream, data: bytes) -> None:
    channel_id = new_id()
    for seq in (0, 7, 2**40):
        model = WsChunkOut(channel_id=channel_id, seq=seq, stream=stream, data=data)
        assert chunk_text(channel_id, seq, stream, data) == ws_text(model)
