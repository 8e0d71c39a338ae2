"""File channels driven directly: real files in tmp_path, a recording ``send`` as the peer."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gurutunnel_agent.channels.files import (
    DownloadChannel,
    FileLimits,
    UploadChannel,
    partial_name,
)
from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages import (
    AgentToServer,
    ExitReason,
    FileAck,
    FileChunk,
    FileDone,
    FileDownload,
    FileFailed,
    FileReady,
    FileUpload,
    TunnelError,
)

SESSION = "s1"
CHANNEL = "c1"
MB = 1024 * 1024
FAST = FileLimits(chunk_bytes=256 * 1024, window_bytes=1 * MB, ack_timeout_s=2.0)
DEADLINE_S = 10.0


class Recorder:
    """The peer's side of ``send``: every frame the agent sent, in order, awaitable."""

    def __init__(self) -> None:
        self.frames: list[AgentToServer] = []
        self._changed = asyncio.Event()
        self.on_frame: Callable[[AgentToServer], None] | None = None

    async def send(self, frame: AgentToServer) -> None:
        self.frames.append(frame)
        if self.on_frame is not None:
            self.on_frame(frame)
        self._changed.set()

    def of(self, kind: type[AgentToServer]) -> list[AgentToServer]:
        return [f for f in self.frames if isinstance(f, kind)]

    def acked(self) -> int:
        # file.ready's offset counts as the first acknowledgement (the bytes the agent holds)
        acks = [f.offset for f in self.frames if isinstance(f, FileAck | FileReady)]
        return max(acks, default=-1)

    async def wait_for(self, ok: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while not ok():
                self._changed.clear()
                await self._changed.wait()

    async def wait_acked(self, at_least: int) -> None:
        await self.wait_for(lambda: self.acked() >= at_least)

    def final(self) -> AgentToServer:
        ends = [f for f in self.frames if isinstance(f, FileDone | FileFailed | TunnelError)]
        assert len(ends) == 1, f"expected exactly one final frame, got {ends}"
        return ends[0]


def _upload_frame(path: Path, data: bytes, **extra: object) -> FileUpload:
    values: dict[str, object] = {
        "req_id": "r1",
        "session_id": SESSION,
        "channel_id": CHANNEL,
        "path": str(path),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        **extra,
    }
    return FileUpload.model_validate(values)


async def _send_upload(
    channel: UploadChannel, rec: Recorder, data: bytes, start: int, *, stop_at: int | None = None
) -> None:
    """Act as the uploader: chunks from ``start`` within the window the agent announced."""
    ready = rec.of(FileReady)[-1]
    assert isinstance(ready, FileReady)
    offset = start
    end = len(data) if stop_at is None else stop_at
    while offset < end:
        piece = data[offset : min(offset + ready.chunk_bytes, end)]
        await rec.wait_acked(offset + len(piece) - ready.window_bytes)
        channel.receive(
            FileChunk(session_id=SESSION, channel_id=CHANNEL, offset=offset, data=piece)
        )
        offset += len(piece)


async def _run_upload(
    target: Path, data: bytes, *, limits: FileLimits = FAST, **extra: object
) -> tuple[UploadChannel, Recorder]:
    rec = Recorder()
    channel = UploadChannel(
        _upload_frame(target, data, **extra),
        rec.send,
        file_allowlist=[target.parent],
        limits=limits,
    )
    assert await channel.start()
    ready = rec.of(FileReady)[0]
    assert isinstance(ready, FileReady)
    async with asyncio.timeout(DEADLINE_S):
        await asyncio.gather(channel.run(), _send_upload(channel, rec, data, ready.offset))
    return channel, rec


def _partials(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".gtpart-" in p.name]


async def test_upload_of_50_mb_in_chunks_arrives_verified_without_partial(tmp_path: Path) -> None:
    """50 MB in 256 KiB chunks land under the final name with their SHA-256; no partial is left."""
    data = os.urandom(50 * MB)
    target = tmp_path / "big.bin"
    _, rec = await _run_upload(target, data)
    done = rec.final()
    assert isinstance(done, FileDone)
    assert done.sha256 == hashlib.sha256(data).hexdigest()
    assert done.size == len(data)
    assert done.path == str(target.resolve())
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert _partials(tmp_path) == []
    assert (target.stat().st_mode & 0o777) == 0o600
    assert rec.acked() == len(data)


async def test_cancelled_upload_keeps_partial_and_resumes_at_its_offset(tmp_path: Path) -> None:
    """A cancel halfway keeps the partial; the same upload again resumes there and completes."""
    data = os.urandom(8 * MB)
    target = tmp_path / "resume.bin"
    rec = Recorder()
    first = UploadChannel(
        _upload_frame(target, data), rec.send, file_allowlist=[tmp_path], limits=FAST
    )
    assert await first.start()
    run = asyncio.create_task(first.run())
    await _send_upload(first, rec, data, 0, stop_at=4 * MB)
    await rec.wait_for(lambda: rec.acked() == 4 * MB)
    first.cancel("file.cancel")
    await asyncio.wait_for(run, DEADLINE_S)
    failed = rec.final()
    assert isinstance(failed, FileFailed)
    assert failed.code == ErrorCode.SESSION_CLOSED
    assert failed.offset == 4 * MB
    assert not target.exists()
    part = tmp_path / partial_name(target.name, hashlib.sha256(data).hexdigest())
    assert part.stat().st_size == 4 * MB

    second, rec2 = await _run_upload(target, data)
    ready = rec2.of(FileReady)[0]
    assert isinstance(ready, FileReady)
    assert ready.offset == 4 * MB
    assert isinstance(rec2.final(), FileDone)
    assert target.read_bytes() == data
    assert _partials(tmp_path) == []
    assert second.offset == len(data)


async def test_partial_longer_than_size_is_discarded(tmp_path: Path) -> None:
    """A partial file larger than the announced size is not a prefix: the upload starts over."""
    data = os.urandom(1 * MB)
    target = tmp_path / "over.bin"
    part = tmp_path / partial_name(target.name, hashlib.sha256(data).hexdigest())
    part.write_bytes(os.urandom(2 * MB))
    _, rec = await _run_upload(target, data)
    ready = rec.of(FileReady)[0]
    assert isinstance(ready, FileReady)
    assert ready.offset == 0
    assert isinstance(rec.final(), FileDone)
    assert target.read_bytes() == data


async def test_wrong_sha256_fails_hash_mismatch_and_leaves_nothing(tmp_path: Path) -> None:
    """Bytes that do not match the announced digest: hash_mismatch, no partial, no target."""
    data = os.urandom(2 * MB)
    target = tmp_path / "bad.bin"
    _, rec = await _run_upload(target, data, sha256="0" * 64)
    failed = rec.final()
    assert isinstance(failed, FileFailed)
    assert failed.code == ErrorCode.HASH_MISMATCH
    assert failed.offset == 0
    assert not target.exists()
    assert _partials(tmp_path) == []


async def test_existing_target_without_overwrite_is_refused(tmp_path: Path) -> None:
    """The target exists and overwrite is false: tunnel.error file_exists, file untouched."""
    target = tmp_path / "keep.txt"
    target.write_bytes(b"original")
    rec = Recorder()
    channel = UploadChannel(
        _upload_frame(target, b"new"), rec.send, file_allowlist=[tmp_path], limits=FAST
    )
    assert not await channel.start()
    error = rec.final()
    assert isinstance(error, TunnelError)
    assert error.code == ErrorCode.FILE_EXISTS
    assert error.req_id == "r1"
    assert target.read_bytes() == b"original"
    assert _partials(tmp_path) == []


async def test_overwrite_replaces_target_and_keeps_its_mode(tmp_path: Path) -> None:
    """With overwrite the target is replaced atomically and keeps its permission bits."""
    target = tmp_path / "script.sh"
    target.write_bytes(b"old")
    target.chmod(0o750)
    data = b"#!/bin/sh\necho new\n"
    _, rec = await _run_upload(target, data, overwrite=True)
    assert isinstance(rec.final(), FileDone)
    assert target.read_bytes() == data
    assert (target.stat().st_mode & 0o777) == 0o750


async def test_upload_above_max_file_bytes_is_refused(tmp_path: Path) -> None:
    """A size above max_file_bytes: tunnel.error file_too_large, nothing created."""
    rec = Recorder()
    limits = FileLimits(max_file_bytes=1000, chunk_bytes=256, window_bytes=1024)
    frame = _upload_frame(tmp_path / "huge.bin", b"x" * 1001)
    channel = UploadChannel(frame, rec.send, file_allowlist=[tmp_path], limits=limits)
    assert not await channel.start()
    error = rec.final()
    assert isinstance(error, TunnelError)
    assert error.code == ErrorCode.FILE_TOO_LARGE
    assert not (tmp_path / "huge.bin").exists()
    assert _partials(tmp_path) == []


async def test_upload_outside_allowlist_is_refused(tmp_path: Path) -> None:
    """An upload outside the allowlist: tunnel.error path_not_allowed, nothing created."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    rec = Recorder()
    frame = _upload_frame(tmp_path / "escape.bin", b"x")
    channel = UploadChannel(frame, rec.send, file_allowlist=[allowed], limits=FAST)
    assert not await channel.start()
    error = rec.final()
    assert isinstance(error, TunnelError)
    assert error.code == ErrorCode.PATH_NOT_ALLOWED
    assert not (tmp_path / "escape.bin").exists()


async def test_empty_upload_completes_at_once(tmp_path: Path) -> None:
    """A zero-byte upload is ready at offset 0 and done without any chunk."""
    target = tmp_path / "empty"
    _, rec = await _run_upload(target, b"")
    assert isinstance(rec.final(), FileDone)
    assert target.read_bytes() == b""


async def test_duplicate_chunk_is_ignored_and_gap_fails(tmp_path: Path) -> None:
    """A re-sent chunk is ignored; a chunk past the end is malformed_frame, partial kept."""
    data = os.urandom(64 * 1024)
    target = tmp_path / "gap.bin"
    rec = Recorder()
    channel = UploadChannel(
        _upload_frame(target, data), rec.send, file_allowlist=[tmp_path], limits=FAST
    )
    assert await channel.start()
    run = asyncio.create_task(channel.run())
    first = FileChunk(session_id=SESSION, channel_id=CHANNEL, offset=0, data=data[:1000])
    channel.receive(first)
    await rec.wait_for(lambda: rec.acked() == 1000)
    channel.receive(first)  # duplicate: ignored
    channel.receive(
        FileChunk(session_id=SESSION, channel_id=CHANNEL, offset=2000, data=data[2000:3000])
    )
    await asyncio.wait_for(run, DEADLINE_S)
    failed = rec.final()
    assert isinstance(failed, FileFailed)
    assert failed.code == ErrorCode.MALFORMED_FRAME
    assert failed.offset == 1000
    assert not target.exists()
    assert _partials(tmp_path) == [partial_name(target.name, hashlib.sha256(data).hexdigest())]


async def test_stalled_uploader_fails_after_ack_timeout(tmp_path: Path) -> None:
    """No chunk for ack_timeout_s: file.failed agent_timeout, the partial kept."""
    data = os.urandom(4096)
    rec = Recorder()
    limits = FileLimits(chunk_bytes=1024, window_bytes=2048, ack_timeout_s=0.2)
    channel = UploadChannel(
        _upload_frame(tmp_path / "slow.bin", data),
        rec.send,
        file_allowlist=[tmp_path],
        limits=limits,
    )
    assert await channel.start()
    channel.receive(FileChunk(session_id=SESSION, channel_id=CHANNEL, offset=0, data=data[:1024]))
    await asyncio.wait_for(channel.run(), DEADLINE_S)
    failed = rec.final()
    assert isinstance(failed, FileFailed)
    assert failed.code == ErrorCode.AGENT_TIMEOUT
    assert failed.offset == 1024


# -- downloads ------------------------------------------------------------------------------


def _download_frame(path: Path, offset: int = 0) -> FileDownload:
    return FileDownload(
        req_id="r2", session_id=SESSION, channel_id=CHANNEL, path=str(path), offset=offset
    )


class WindowedReceiver:
    """A downloader that acknowledges only when the window is full (or the file is in)."""

    def __init__(self, channel: DownloadChannel, rec: Recorder, size: int, start: int) -> None:
        self.channel = channel
        self.size = size
        self.received = bytearray()
        self.end = start
        self.acked = start
        self.max_unacked = 0
        self.window = 0
        rec.on_frame = self.on_frame

    def on_frame(self, frame: AgentToServer) -> None:
        if isinstance(frame, FileReady):
            self.window = frame.window_bytes
        elif isinstance(frame, FileChunk):
            assert frame.offset == self.end, "chunks arrive in order without gaps"
            self.received += frame.data
            self.end += len(frame.data)
            self.max_unacked = max(self.max_unacked, self.end - self.acked)
            if self.end - self.acked >= self.window or self.end == self.size:
                self.acked = self.end
                self.channel.ack(self.end)


async def _run_download(
    path: Path, size: int, offset: int = 0, limits: FileLimits = FAST
) -> tuple[Recorder, WindowedReceiver]:
    rec = Recorder()
    channel = DownloadChannel(
        _download_frame(path, offset), rec.send, file_allowlist=[path.parent], limits=limits
    )
    receiver = WindowedReceiver(channel, rec, size, offset)
    await asyncio.wait_for(channel.serve(), DEADLINE_S)
    return rec, receiver


async def test_download_of_50_mb_reassembles_within_the_window(tmp_path: Path) -> None:
    """50 MB arrive whole with the announced SHA-256, never more than window_bytes unacked."""
    data = os.urandom(50 * MB)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    rec, receiver = await _run_download(source, len(data))
    ready = rec.of(FileReady)[0]
    assert isinstance(ready, FileReady)
    digest = hashlib.sha256(data).hexdigest()
    assert (ready.size, ready.sha256, ready.offset) == (len(data), digest, 0)
    done = rec.final()
    assert isinstance(done, FileDone)
    assert done.sha256 == digest
    assert hashlib.sha256(receiver.received).hexdigest() == digest
    # the window was filled (the receiver waited for it) and never exceeded
    assert receiver.max_unacked == FAST.window_bytes
    assert all(len(f.data) <= FAST.chunk_bytes for f in rec.frames if isinstance(f, FileChunk))


async def test_download_resumes_from_an_offset(tmp_path: Path) -> None:
    """From offset N the agent sends exactly the bytes after N; the whole digest is announced."""
    data = os.urandom(3 * MB + 12345)
    source = tmp_path / "part.bin"
    source.write_bytes(data)
    offset = 1 * MB + 7
    rec, receiver = await _run_download(source, len(data), offset)
    ready = rec.of(FileReady)[0]
    assert isinstance(ready, FileReady)
    assert ready.offset == offset
    assert ready.sha256 == hashlib.sha256(data).hexdigest()
    assert bytes(receiver.received) == data[offset:]
    assert isinstance(rec.final(), FileDone)


async def test_download_offset_beyond_end_is_refused(tmp_path: Path) -> None:
    """An offset past the end of the file: tunnel.error malformed_frame."""
    source = tmp_path / "small.bin"
    source.write_bytes(b"abc")
    rec = Recorder()
    channel = DownloadChannel(
        _download_frame(source, 4), rec.send, file_allowlist=[tmp_path], limits=FAST
    )
    assert not await channel.start()
    error = rec.final()
    assert isinstance(error, TunnelError)
    assert error.code == ErrorCode.MALFORMED_FRAME


async def test_file_modified_during_download_fails_hash_mismatch(tmp_path: Path) -> None:
    """Bytes changed after file.ready: the transfer ends hash_mismatch, never file.done."""
    data = os.urandom(4 * MB)
    source = tmp_path / "moving.bin"
    source.write_bytes(data)
    rec = Recorder()
    channel = DownloadChannel(
        _download_frame(source), rec.send, file_allowlist=[tmp_path], limits=FAST
    )
    assert await channel.start()
    run = asyncio.create_task(channel.run())
    await rec.wait_for(lambda: sum(isinstance(f, FileChunk) for f in rec.frames) >= 4)
    # the window is full (1 MiB sent, nothing acked): change a byte the agent has not read yet
    with source.open("r+b") as fh:
        fh.seek(3 * MB)
        fh.write(bytes([data[3 * MB] ^ 0xFF]))
    receiver_end = 1 * MB
    channel.ack(receiver_end)

    def ack_all(frame: AgentToServer) -> None:
        if isinstance(frame, FileChunk):
            channel.ack(frame.offset + len(frame.data))

    rec.on_frame = ack_all
    await asyncio.wait_for(run, DEADLINE_S)
    failed = rec.final()
    assert isinstance(failed, FileFailed)
    assert failed.code == ErrorCode.HASH_MISMATCH


async def test_stalled_receiver_fails_after_ack_timeout(tmp_path: Path) -> None:
    """A receiver that never acknowledges: file.failed agent_timeout after ack_timeout_s."""
    source = tmp_path / "stall.bin"
    source.write_bytes(os.urandom(64 * 1024))
    limits = FileLimits(chunk_bytes=4096, window_bytes=16 * 1024, ack_timeout_s=0.2)
    rec = Recorder()
    channel = DownloadChannel(
        _download_frame(source), rec.send, file_allowlist=[tmp_path], limits=limits
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(channel.serve(), DEADLINE_S)
    elapsed = loop.time() - started
    failed = rec.final()
    assert isinstance(failed, FileFailed)
    assert failed.code == ErrorCode.AGENT_TIMEOUT
    assert sum(len(f.data) for f in rec.frames if isinstance(f, FileChunk)) == 16 * 1024
    assert 0.2 <= elapsed < 5.0


async def test_cancelled_download_ends_with_one_failure(tmp_path: Path) -> None:
    """cancel() while waiting for acks: one file.failed session_closed, offset = acked bytes."""
    source = tmp_path / "cancel.bin"
    source.write_bytes(os.urandom(2 * MB))
    rec = Recorder()
    channel = DownloadChannel(
        _download_frame(source), rec.send, file_allowlist=[tmp_path], limits=FAST
    )
    assert await channel.start()
    run = asyncio.create_task(channel.run())
    await rec.wait_for(lambda: sum(isinstance(f, FileChunk) for f in rec.frames) >= 2)
    channel.ack(256 * 1024)
    channel.cancel("session closed")
    await asyncio.wait_for(run, DEADLINE_S)
    failed = rec.final()
    assert isinstance(failed, FileFailed)
    assert failed.code == ErrorCode.SESSION_CLOSED
    assert failed.offset == 256 * 1024


@pytest.mark.parametrize("kind", ["directory", "symlink"])
async def test_download_of_non_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    """A directory or a symlink as the file to download: tunnel.error path_not_allowed."""
    path = tmp_path / "thing"
    if kind == "directory":
        path.mkdir()
    else:
        (tmp_path / "real").write_bytes(b"x")
        path.symlink_to(tmp_path / "real")
    rec = Recorder()
    channel = DownloadChannel(
        _download_frame(path), rec.send, file_allowlist=[tmp_path], limits=FAST
    )
    assert not await channel.start()
    error = rec.final()
    assert isinstance(error, TunnelError)
    assert error.code == ErrorCode.PATH_NOT_ALLOWED


async def test_target_appearing_during_upload_is_not_clobbered(tmp_path: Path) -> None:
    """Without overwrite, a target created mid-upload survives; file_exists, partial kept."""
    data = os.urandom(64 * 1024)
    target = tmp_path / "race.bin"
    rec = Recorder()
    channel = UploadChannel(
        _upload_frame(target, data), rec.send, file_allowlist=[tmp_path], limits=FAST
    )
    assert await channel.start()
    target.write_bytes(b"someone else's")
    channel.receive(FileChunk(session_id=SESSION, channel_id=CHANNEL, offset=0, data=data))
    await asyncio.wait_for(channel.run(), DEADLINE_S)
    failed = rec.final()
    assert isinstance(failed, FileFailed)
    assert failed.code == ErrorCode.FILE_EXISTS
    assert failed.offset == len(data)
    assert target.read_bytes() == b"someone else's"
    assert _partials(tmp_path) == [partial_name(target.name, hashlib.sha256(data).hexdigest())]


async def test_second_upload_of_same_content_while_first_runs_is_refused(tmp_path: Path) -> None:
    """Two uploads of the same content to the same path never share the partial file."""
    data = os.urandom(4096)
    target = tmp_path / "twice.bin"
    rec1, rec2 = Recorder(), Recorder()
    first = UploadChannel(
        _upload_frame(target, data), rec1.send, file_allowlist=[tmp_path], limits=FAST
    )
    second = UploadChannel(
        _upload_frame(target, data), rec2.send, file_allowlist=[tmp_path], limits=FAST
    )
    assert await first.start()
    assert not await second.start()
    error = rec2.final()
    assert isinstance(error, TunnelError)
    assert error.code == ErrorCode.FILE_EXISTS
    first.cancel()
    await asyncio.wait_for(first.run(), DEADLINE_S)
    assert isinstance(rec1.final(), FileFailed)


async def test_uploader_exceeding_the_window_fails_rate_limited(tmp_path: Path) -> None:
    """More than window_bytes beyond the last ack: file.failed rate_limited."""
    data = os.urandom(8192)
    rec = Recorder()
    limits = FileLimits(chunk_bytes=1024, window_bytes=2048)
    channel = UploadChannel(
        _upload_frame(tmp_path / "flood.bin", data),
        rec.send,
        file_allowlist=[tmp_path],
        limits=limits,
    )
    assert await channel.start()
    for offset in range(0, 3072, 1024):  # three chunks before any ack was possible
        channel.receive(
            FileChunk(
                session_id=SESSION,
                channel_id=CHANNEL,
                offset=offset,
                data=data[offset : offset + 1024],
            )
        )
    await asyncio.wait_for(channel.run(), DEADLINE_S)
    failed = rec.final()
    assert isinstance(failed, FileFailed)
    assert failed.code == ErrorCode.RATE_LIMITED


async def test_lost_socket_ends_the_download_without_hanging(tmp_path: Path) -> None:
    """A ``send`` that raises stops the transfer; run() returns instead of waiting for acks."""
    source = tmp_path / "lost.bin"
    source.write_bytes(os.urandom(64 * 1024))
    sent: list[AgentToServer] = []

    async def send(frame: AgentToServer) -> None:
        if isinstance(frame, FileChunk):
            raise ConnectionError("socket gone")
        sent.append(frame)

    channel = DownloadChannel(_download_frame(source), send, file_allowlist=[tmp_path])
    await asyncio.wait_for(channel.serve(), DEADLINE_S)
    assert [type(f) for f in sent] == [FileReady]
    assert isinstance(channel.result, FileFailed)
    assert channel.result.code == ErrorCode.SESSION_CLOSED


async def test_cancel_before_ready_answers_the_request_session_closed(tmp_path: Path) -> None:
    """A transfer cancelled while it is being prepared answers tunnel.error session_closed."""
    source = tmp_path / "early.bin"
    source.write_bytes(os.urandom(4096))
    rec = Recorder()
    channel = DownloadChannel(
        _download_frame(source), rec.send, file_allowlist=[tmp_path], limits=FAST
    )
    channel.cancel("session closed")
    assert not await channel.start()
    error = rec.final()
    assert isinstance(error, TunnelError)
    assert error.code == ErrorCode.SESSION_CLOSED
    assert error.req_id == "r2"


async def test_request_stop_cancels_like_the_other_channels(tmp_path: Path) -> None:
    """request_stop(session_closed) ends an upload with one file.failed, the partial kept."""
    data = os.urandom(4096)
    target = tmp_path / "stop.bin"
    rec = Recorder()
    channel = UploadChannel(
        _upload_frame(target, data), rec.send, file_allowlist=[tmp_path], limits=FAST
    )
    assert await channel.start()
    channel.receive(FileChunk(session_id=SESSION, channel_id=CHANNEL, offset=0, data=data[:100]))
    run = asyncio.create_task(channel.run())
    await rec.wait_acked(100)
    channel.request_stop(ExitReason.SESSION_CLOSED)
    await asyncio.wait_for(run, DEADLINE_S)
    failed = rec.final()
    assert isinstance(failed, FileFailed)
    assert failed.code == ErrorCode.SESSION_CLOSED
    assert "session_closed" in failed.error
    assert failed.offset == 100
    assert channel.pid is None
