"""The client-facing hooks of the file runtimes: bounded preparation, executor, abandon."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gurutunnel_agent.channels.files import DownloadChannel, FileLimits, UploadChannel
from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages import (
    AgentToServer,
    ExitReason,
    FileDownload,
    FileFailed,
    FileReady,
    FileUpload,
    TunnelError,
)


class Sent:
    def __init__(self) -> None:
        self.frames: list[AgentToServer] = []

    async def __call__(self, frame: AgentToServer) -> None:
        self.frames.append(frame)


def _upload(path: Path, data: bytes) -> FileUpload:
    return FileUpload(
        req_id="r1",
        session_id="s1",
        channel_id="c1",
        path=str(path),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


async def test_hung_preparation_is_answered_agent_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start() whose filesystem work hangs answers tunnel.error{agent_timeout} in time."""
    release = threading.Event()
    sent = Sent()
    channel = UploadChannel(
        _upload(tmp_path / "x", b"abc"),
        sent,
        file_allowlist=[tmp_path],
        limits=FileLimits(prepare_timeout_s=0.1),
    )
    monkeypatch.setattr(channel, "_prepare", lambda: release.wait(10))
    try:
        async with asyncio.timeout(5):
            assert await channel.start() is False
    finally:
        release.set()
    [answer] = sent.frames
    assert isinstance(answer, TunnelError)
    assert (answer.code, answer.req_id) == (ErrorCode.AGENT_TIMEOUT, "r1")


async def test_filesystem_work_runs_on_the_injected_executor(tmp_path: Path) -> None:
    """Every worker call goes to the executor the client passes (not the default one)."""
    source = tmp_path / "f"
    source.write_bytes(b"hello")
    names: list[str] = []
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-files")
    original = executor.submit

    def submit(fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        names.append(getattr(fn, "__name__", "?"))
        return original(fn, *args, **kwargs)

    executor.submit = submit  # type: ignore[method-assign]
    sent = Sent()
    channel = DownloadChannel(
        FileDownload(req_id="r", session_id="s1", channel_id="c1", path=str(source)),
        sent,
        file_allowlist=[tmp_path],
        executor=executor,
    )
    try:
        assert await channel.start() is True
    finally:
        executor.shutdown(wait=True)
    assert "_prepare" in names
    assert isinstance(sent.frames[0], FileReady)


async def test_abandon_sends_one_failure_for_a_ready_transfer(tmp_path: Path) -> None:
    """abandon() after file.ready sends file.failed{session_closed} once, then nothing more."""
    sent = Sent()
    data = b"x" * 10
    channel = UploadChannel(_upload(tmp_path / "a", data), sent, file_allowlist=[tmp_path])
    assert await channel.start() is True
    await channel.abandon(ExitReason.SESSION_CLOSED)
    await channel.abandon(ExitReason.SESSION_CLOSED)
    failures = [f for f in sent.frames if isinstance(f, FileFailed)]
    assert len(failures) == 1
    assert (failures[0].code, failures[0].offset) == (ErrorCode.SESSION_CLOSED, 0)
