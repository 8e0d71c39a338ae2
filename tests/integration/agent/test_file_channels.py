"""File transfers through the real agent client over a real WebSocket (the fake gateway).

Each test opens session s1 on an agent whose ``file_allowlist`` is ``tmp_path`` and drives
``file.*`` frames as the gateway would, acknowledging and windowing like a real peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages import (
    FileAck,
    FileCancel,
    FileChunk,
    FileDone,
    FileDownload,
    FileFailed,
    FileReady,
    FileUpload,
    TunnelClose,
    TunnelClosed,
    TunnelError,
    TunnelOpen,
    TunnelReady,
)
from tests.integration.agent.tunnel_harness import Tunnel

KIB = 1024
MIB = 1024 * KIB
CHUNK = 64 * KIB
WINDOW = 256 * KIB
SIZE = 3 * MIB

OpenTunnel = Callable[..., Awaitable[Tunnel]]


async def _open(open_tunnel: OpenTunnel, tmp_path: Path) -> Tunnel:
    return await open_tunnel(
        file_allowlist=[tmp_path],
        file_chunk_bytes=CHUNK,
        file_window_bytes=WINDOW,
        file_ack_timeout_s=5.0,
    )


def _partials(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.gtpart-*"))


def _upload_frame(path: Path, data: bytes, channel_id: str) -> FileUpload:
    return FileUpload(
        req_id=f"req-{channel_id}",
        session_id="s1",
        channel_id=channel_id,
        path=str(path),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


async def _ready(tunnel: Tunnel, channel_id: str) -> FileReady:
    answer = await tunnel.next_for(channel_id)
    assert isinstance(answer, FileReady), answer
    assert answer.req_id == f"req-{channel_id}"
    return answer


async def _send_upload(
    tunnel: Tunnel, channel_id: str, data: bytes, ready: FileReady, *, stop_at: int | None = None
) -> int:
    """Send chunks from ``ready.offset`` within the window as acks arrive; the acked offset.

    Stops once ``stop_at`` bytes are acknowledged (None: all of ``data``).
    """
    end = len(data) if stop_at is None else stop_at
    sent = acked = ready.offset
    while acked < end:
        if sent < end and sent + ready.chunk_bytes - acked <= ready.window_bytes:
            piece = data[sent : min(sent + ready.chunk_bytes, end)]
            await tunnel.send(
                FileChunk(session_id="s1", channel_id=channel_id, offset=sent, data=piece)
            )
            sent += len(piece)
            continue
        frame = await tunnel.next_for(channel_id)
        assert isinstance(frame, FileAck), frame
        assert frame.offset <= sent
        acked = frame.offset
    return acked


async def _final(tunnel: Tunnel, channel_id: str) -> FileDone | FileFailed:
    """The transfer's final frame, skipping the acks still on their way."""
    while True:
        frame = await tunnel.next_for(channel_id)
        if isinstance(frame, FileDone | FileFailed):
            return frame
        assert isinstance(frame, FileAck), frame


async def test_upload_over_the_socket_lands_verified_without_partial(
    open_tunnel: OpenTunnel, tmp_path: Path
) -> None:
    """file.upload -> file.ready -> windowed chunks as acks arrive -> file.done; sha256 matches."""
    tunnel = await _open(open_tunnel, tmp_path)
    data = os.urandom(SIZE)
    target = tmp_path / "up.bin"
    await tunnel.send(_upload_frame(target, data, "u1"))
    ready = await _ready(tunnel, "u1")
    assert (ready.offset, ready.size) == (0, SIZE)
    assert (ready.window_bytes, ready.chunk_bytes) == (WINDOW, CHUNK)
    assert await _send_upload(tunnel, "u1", data, ready) == SIZE
    done = await _final(tunnel, "u1")
    assert isinstance(done, FileDone), done
    assert (done.size, done.sha256) == (SIZE, hashlib.sha256(data).hexdigest())
    assert hashlib.sha256(target.read_bytes()).hexdigest() == done.sha256
    assert _partials(tmp_path) == []


async def test_download_over_the_socket_reassembles_to_the_announced_digest(
    open_tunnel: OpenTunnel, tmp_path: Path
) -> None:
    """file.download -> file.ready{sha256} -> chunks within the window as the test acks."""
    tunnel = await _open(open_tunnel, tmp_path)
    source = tmp_path / "down.bin"
    source.write_bytes(os.urandom(SIZE))
    await tunnel.send(
        FileDownload(req_id="req-d1", session_id="s1", channel_id="d1", path=str(source))
    )
    ready = await _ready(tunnel, "d1")
    assert (ready.offset, ready.size) == (0, SIZE)
    received = bytearray()
    acked = 0
    while True:
        frame = await tunnel.next_for("d1")
        if isinstance(frame, FileDone):
            break
        assert isinstance(frame, FileChunk), frame
        assert frame.offset == len(received)
        assert len(frame.data) <= ready.chunk_bytes
        received += frame.data
        # the agent's acked offset is at most ours, so it may never run further ahead of ours
        assert len(received) - acked <= ready.window_bytes
        if len(received) - acked >= ready.window_bytes // 2 or len(received) == SIZE:
            acked = len(received)
            await tunnel.send(FileAck(session_id="s1", channel_id="d1", offset=acked))
    assert hashlib.sha256(received).hexdigest() == ready.sha256 == frame.sha256
    assert len(received) == frame.size == SIZE


async def test_download_without_acks_stops_at_the_window_and_times_out(
    open_tunnel: OpenTunnel, tmp_path: Path
) -> None:
    """No file.ack: exactly window_bytes are sent, then file.failed{agent_timeout, offset 0}."""
    tunnel = await open_tunnel(
        file_allowlist=[tmp_path],
        file_chunk_bytes=CHUNK,
        file_window_bytes=WINDOW,
        file_ack_timeout_s=0.3,
    )
    source = tmp_path / "win.bin"
    source.write_bytes(os.urandom(2 * WINDOW))
    await tunnel.send(
        FileDownload(req_id="req-d2", session_id="s1", channel_id="d2", path=str(source))
    )
    await _ready(tunnel, "d2")
    got = 0
    while True:
        frame = await tunnel.next_for("d2")
        if not isinstance(frame, FileChunk):
            break
        got += len(frame.data)
    assert got == WINDOW
    assert isinstance(frame, FileFailed), frame
    assert (frame.code, frame.offset) == (ErrorCode.AGENT_TIMEOUT, 0)


async def test_cancelled_upload_keeps_partial_and_next_upload_resumes_there(
    open_tunnel: OpenTunnel, tmp_path: Path
) -> None:
    """file.cancel -> file.failed{session_closed, offset}; a new upload resumes at that offset."""
    tunnel = await _open(open_tunnel, tmp_path)
    data = os.urandom(SIZE)
    target = tmp_path / "resume.bin"
    await tunnel.send(_upload_frame(target, data, "u1"))
    ready = await _ready(tunnel, "u1")
    acked = await _send_upload(tunnel, "u1", data, ready, stop_at=MIB)
    await tunnel.send(FileCancel(session_id="s1", channel_id="u1"))
    failed = await _final(tunnel, "u1")
    assert isinstance(failed, FileFailed), failed
    assert failed.code is ErrorCode.SESSION_CLOSED
    assert failed.offset == acked == MIB
    [partial] = _partials(tmp_path)
    assert partial.stat().st_size == MIB
    assert not target.exists()

    await tunnel.send(_upload_frame(target, data, "u2"))
    ready = await _ready(tunnel, "u2")
    assert ready.offset == MIB
    await _send_upload(tunnel, "u2", data, ready)
    done = await _final(tunnel, "u2")
    assert isinstance(done, FileDone), done
    assert target.read_bytes() == data
    assert _partials(tmp_path) == []


@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_tunnel_close_mid_transfer_sends_one_failure_before_tunnel_closed(
    open_tunnel: OpenTunnel, tmp_path: Path, direction: str
) -> None:
    """tunnel.close while a transfer waits for its peer: one file.failed, then tunnel.closed."""
    tunnel = await _open(open_tunnel, tmp_path)
    data = os.urandom(2 * WINDOW)
    if direction == "upload":
        await tunnel.send(_upload_frame(tmp_path / "t.bin", data, "x1"))
        ready = await _ready(tunnel, "x1")
        await _send_upload(tunnel, "x1", data, ready, stop_at=CHUNK)
    else:
        source = tmp_path / "t.bin"
        source.write_bytes(data)
        await tunnel.send(
            FileDownload(req_id="req-x1", session_id="s1", channel_id="x1", path=str(source))
        )
        await _ready(tunnel, "x1")
        await tunnel.next_for("x1")  # the first chunk: the transfer runs
    await tunnel.send(TunnelClose(req_id="close", session_id="s1"))
    closed = await tunnel.next_for("")
    assert isinstance(closed, TunnelClosed), closed
    # a barrier: every frame the agent sent for s1 arrives before the answer to a new open
    await tunnel.send(TunnelOpen(req_id="open2", session_id="s2", tech_id="t1"))
    assert isinstance(await tunnel.next_for(""), TunnelReady)
    failures = [f for f in tunnel.order if isinstance(f, FileFailed)]
    assert len(failures) == 1
    assert failures[0].code is ErrorCode.SESSION_CLOSED
    assert tunnel.order.index(failures[0]) < tunnel.order.index(closed)
    assert not any(isinstance(f, FileDone) for f in tunnel.order)


@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_path_outside_file_allowlist_is_refused_path_not_allowed(
    open_tunnel: OpenTunnel, tmp_path: Path, direction: str
) -> None:
    """A path outside file_allowlist -> tunnel.error{path_not_allowed} echoing req_id."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    tunnel = await open_tunnel(file_allowlist=[allowed])
    if direction == "upload":
        frame: FileUpload | FileDownload = _upload_frame(tmp_path / "new.bin", b"x", "p1")
    else:
        frame = FileDownload(req_id="req-p1", session_id="s1", channel_id="p1", path=str(outside))
    await tunnel.send(frame)
    answer = await tunnel.next_for("p1")
    assert isinstance(answer, TunnelError), answer
    assert (answer.code, answer.req_id) == (ErrorCode.PATH_NOT_ALLOWED, "req-p1")
    assert not (tmp_path / "new.bin").exists()
    assert _partials(tmp_path) == []
    # the refused channel is released: its id may be used again
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while tunnel.agent.client.tunnel.channels and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert tunnel.agent.client.tunnel.channels == {}


async def test_lost_socket_cancels_the_upload_and_keeps_its_partial(
    open_tunnel: OpenTunnel, tmp_path: Path
) -> None:
    """Socket loss mid-upload: the runtime ends (partial kept), the agent reconnects, resumes."""
    tunnel = await _open(open_tunnel, tmp_path)
    data = os.urandom(SIZE)
    target = tmp_path / "lost.bin"
    await tunnel.send(_upload_frame(target, data, "u1"))
    ready = await _ready(tunnel, "u1")
    acked = await _send_upload(tunnel, "u1", data, ready, stop_at=MIB)
    await tunnel.ws.close()
    ws = await tunnel.gateway.next_connection()
    assert tunnel.agent.client.tunnel.session_id is None
    await tunnel.gateway.send(ws, TunnelOpen(req_id="open", session_id="s1", tech_id="t1"))
    await tunnel.gateway.next_frame(TunnelReady)
    again = Tunnel(tunnel.gateway, ws, tunnel.agent, tmp_path)
    await again.send(_upload_frame(target, data, "u2"))
    ready = await _ready(again, "u2")
    assert ready.offset == acked
    await _send_upload(again, "u2", data, ready)
    done = await _final(again, "u2")
    assert isinstance(done, FileDone), done
    assert target.read_bytes() == data
