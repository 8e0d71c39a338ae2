"""Simulated agents: many real-protocol agent sockets in one process (``python -m bench.simagent``).

Contract:
- Started with one argument, a JSON file (:class:`SimConfig`): the gateway URLs, one credential
  per agent (``mode="gurutunnel"``) or a socket count (``mode="bare"``, for the bare websockets
  baseline), the source IP of its sockets and how many connect at once.
- Reads commands from stdin, one JSON object per line: ``{"op": "target", "n": k}`` keeps agents
  ``0..k-1`` connected (agents are only ever added), ``{"op": "beat", "interval_s": s}`` makes
  every agent beat every ``s`` seconds from now on (each one's next beat at a random point of the
  first interval, so the fleet does not beat in step), ``{"op": "mark"}`` restarts the count of
  distinct agents welcomed (``back`` in the status), ``{"op": "stop"}`` closes every socket and
  exits. Writes JSON lines to stdout: ``{"event": "status", "connected": c, "target": t, ...}``
  whenever a count changed (at most every ``status_interval_s``).
- A gurutunnel agent speaks protocol version 1 exactly as ``docs/protocol.md`` says, with the
  codec of ``gurutunnel_protocol``: the credential in ``Authorization``, ``heartbeat`` at once
  after ``welcome`` and then every ``heartbeat_interval_s``, ``tunnel.open``/``tunnel.close``,
  ``channel.open``/``channel.close``, ``terminal.command``, ``terminal.cancel`` and the file
  frames. It runs no process: commands are answered in-process (``bench echo`` prints ``ok``;
  ``bench stream TOTAL CHUNK`` emits TOTAL bytes of incompressible output in CHUNK-byte
  ``terminal.chunk`` frames as fast as the socket takes them and, when the command carries
  ``window_bytes``, its ``terminal.ack`` s allow, until done or cancelled). Uploads
  are hashed and dropped (no disk); a download of ``/bench/download/<size>`` sends ``size``
  bytes of a fixed pseudo-random pattern.
- Reconnects follow the real agent: ``gurutunnel_agent.client.Backoff`` with the agent's
  defaults (1 s initial, x2, 60 s cap, full jitter, reset after 30 s up), the same URL first after
  a working connection dropped, the next URL after an attempt that got no ``welcome``.
- The soft ``RLIMIT_NOFILE`` is raised to the hard limit (the machine caps it per process).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gurutunnel_agent.channels.output import OutputWindow
from gurutunnel_agent.client import Backoff
from gurutunnel_gateway.collector import stop_automatic_full_collections
from gurutunnel_protocol import ErrorCode, ProtocolError
from gurutunnel_protocol.envelope import decode_server_to_agent, encode_text
from gurutunnel_protocol.messages import (
    ChannelClose,
    ChannelClosed,
    ChannelOpen,
    ChannelOpened,
    ExitReason,
    FileAck,
    FileCancel,
    FileChunk,
    FileDone,
    FileDownload,
    FileFailed,
    FileReady,
    FileUpload,
    Heartbeat,
    HostMetrics,
    Reconnect,
    ShellOpen,
    Terminal,
    TerminalAck,
    TerminalCancel,
    TerminalExit,
    TerminalStarted,
    TunnelClose,
    TunnelClosed,
    TunnelError,
    TunnelOpen,
    TunnelReady,
    Welcome,
    chunk_cost,
)

# The real agent's defaults (agent/gurutunnel_agent/config.py)
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0
BACKOFF_FACTOR = 2.0
BACKOFF_RESET_AFTER_S = 30.0
AGENT_PING_INTERVAL_S = 20.0
AGENT_PING_TIMEOUT_S = 20.0
AGENT_MAX_FRAME_BYTES = 1 << 20
FILE_CHUNK_BYTES = 256 * 1024
FILE_WINDOW_BYTES = 4 * 1024 * 1024

PATTERN_BYTES = 1 << 20
PATTERN = random.Random(5).randbytes(PATTERN_BYTES)
"""Output and download content: pseudo-random, so WebSocket compression gains nothing."""
DOWNLOAD_PREFIX = "/bench/download/"


def pattern_bytes(offset: int, size: int) -> bytes:
    """``size`` bytes of the endless repetition of ``PATTERN`` starting at ``offset``."""
    out = bytearray()
    while size > 0:
        start = offset % PATTERN_BYTES
        piece = PATTERN[start : start + size]
        out += piece
        offset += len(piece)
        size -= len(piece)
    return bytes(out)


def pattern_sha256(size: int) -> str:
    """SHA-256 of the first ``size`` bytes of the pattern."""
    digest = hashlib.sha256()
    full, rest = divmod(size, PATTERN_BYTES)
    for _ in range(full):
        digest.update(PATTERN)
    digest.update(PATTERN[:rest])
    return digest.hexdigest()


def chunk_text(session_id: str, channel_id: str, seq: int, data_b64: str) -> str:
    """A stdout ``terminal.chunk`` frame, the same text as ``encode_text(TerminalChunk(...))``
    (checked by tests/bench), built by hand so that the simulated agent's encoder is not what
    the benchmark measures."""
    return (
        f'{{"v":1,"type":"terminal.chunk","session_id":"{session_id}","channel_id":"{channel_id}",'
        f'"seq":{seq},"stream":"stdout","data":"{data_b64}"}}'
    )


_ECHO_MARK = '"command":"bench echo"'


def echo_answer_text(req_id: str, session_id: str, channel_id: str) -> str:
    """``bench echo``'s whole answer: ``terminal.started`` carrying its ``ok\\n`` chunk and exit
    (as the real agent answers a command that ended within its inline window), the same text as
    the codec's (checked by tests/bench), built by hand for the reason of :func:`chunk_text`."""
    return (
        f'{{"v":1,"type":"terminal.started","req_id":"{req_id}","session_id":"{session_id}",'
        f'"channel_id":"{channel_id}","pid":null,"output":['
        + chunk_text(session_id, channel_id, 0, "b2sK")
        + f'],"exit":{{"v":1,"type":"terminal.exit","session_id":"{session_id}",'
        f'"channel_id":"{channel_id}","seq":1,"reason":"exited","exit_code":0,'
        '"truncated":false,"duration_s":0.0,"stdout_bytes":3,"stderr_bytes":0,"error":null},'
        '"window_bytes":null}'
    )


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class SimConfig(BaseModel):
    """What one simulated-agent process runs (written by the harness as JSON)."""

    mode: Literal["gurutunnel", "bare"] = "gurutunnel"
    urls: list[str]
    credentials: list[str] = []
    count: int = 0
    """Bare mode: how many sockets (there is no credential)."""
    source_ip: str = "127.0.0.1"
    connect_concurrency: int = 25
    """First connections in flight at once (reconnects are not limited, as in a real fleet)."""
    status_interval_s: float = 0.2
    heartbeat_interval_s: float = 30.0
    """The agent's own cap; the gateway's ``welcome`` may ask for less."""

    @property
    def size(self) -> int:
        return len(self.credentials) if self.mode == "gurutunnel" else self.count


def _metrics() -> HostMetrics:
    return HostMetrics(
        hostname="bench-agent",
        os="Linux",
        os_release="6.1.0",
        agent_version="bench",
        cpu_percent=1.0,
        cpu_count=2,
        mem_total_bytes=8 << 30,
        mem_used_percent=20.0,
        disk_total_bytes=100 << 30,
        disk_used_percent=30.0,
        boot_time=datetime(2026, 1, 1, tzinfo=UTC),
        load_avg=(0.1, 0.1, 0.1),
    )


@dataclass
class Counters:
    connected: int = 0
    connections: int = 0
    attempts: int = 0
    failures: int = 0
    refused: int = 0
    """Failures by kind: TCP connection refused (a dead gateway)."""
    timeouts: int = 0
    """... no open handshake within the client's open_timeout."""
    rejected: int = 0
    """... an HTTP answer other than 101 (e.g. 503 while draining)."""
    errors_received: int = 0
    commands: int = 0
    back: int = 0
    """Distinct agents welcomed (bare mode: connected) since the last ``mark`` (since the start
    before any)."""
    heartbeats: int = 0
    """Heartbeats sent (what the gateway decoded and published, for its CPU per heartbeat)."""

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Upload:
    frame: FileUpload
    digest: Any = field(default_factory=hashlib.sha256)
    received: int = 0


@dataclass
class _Download:
    frame: FileDownload
    size: int
    sha256: str
    sent: int
    acked: int
    moved: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class AgentSocket:
    """One connected agent: answers the gateway's frames (see the module contract)."""

    def __init__(self, ws: ClientConnection, process: SimProcess, index: int) -> None:
        self.ws = ws
        self.process = process
        self.index = index
        self.welcome: Welcome | None = None
        self.session_id: str | None = None
        self.channels: dict[str, asyncio.Task[None]] = {}
        self.uploads: dict[str, _Upload] = {}
        self.downloads: dict[str, _Download] = {}
        self.windows: dict[str, OutputWindow] = {}
        self.reconnect_delay_s: float | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    async def send(self, frame: BaseModel) -> None:
        await self.ws.send(encode_text(frame))

    async def serve(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    continue  # version 1 is text only
                if _ECHO_MARK in raw and await self._fast_echo(raw):
                    continue
                try:
                    frame = decode_server_to_agent(raw)
                except ProtocolError:
                    continue
                await self.handle(frame)
        except ConnectionClosed:
            pass
        finally:
            self.process.beating.discard(self)
            if self._heartbeat is not None:
                self._heartbeat.cancel()
            for task in [*self.channels.values()]:
                task.cancel()
            for download in self.downloads.values():
                if download.task is not None:
                    download.task.cancel()

    async def _fast_echo(self, raw: str) -> bool:
        """Answer ``bench echo`` in the open session from a plain JSON parse (the codec's
        validation is not what the gateway benchmarks measure); False: take the full path."""
        try:
            fields = json.loads(raw)
        except ValueError:
            return False
        if (
            not isinstance(fields, dict)
            or fields.get("type") != "terminal.command"
            or fields.get("command") != "bench echo"
            or fields.get("inline_result") is not True
            or fields.get("session_id") != self.session_id
            or fields.get("channel_id") in self.channels
            or not isinstance(fields.get("req_id"), str)
        ):
            return False
        self.process.counters.commands += 1
        await self.ws.send(
            echo_answer_text(fields["req_id"], fields["session_id"], fields["channel_id"])
        )
        return True

    async def handle(self, frame: Any) -> None:
        if isinstance(frame, Welcome):
            self.welcome = frame
            self.process.counters.connected += 1
            self.process.welcomed(self.index)
            self.process.beating.add(self)
            self.beat_every(self.process.beat_override_s or frame.heartbeat_interval_s)
        elif isinstance(frame, Terminal):
            await self._command(frame)
        elif isinstance(frame, TerminalCancel):
            task = self.channels.get(frame.channel_id)
            if task is not None:
                task.cancel()
        elif isinstance(frame, TerminalAck):
            window = self.windows.get(frame.channel_id)
            if window is not None:
                window.ack(frame.seq)
        elif isinstance(frame, TunnelOpen):
            if self.session_id not in (None, frame.session_id):
                await self.send(
                    TunnelError(
                        req_id=frame.req_id,
                        session_id=frame.session_id,
                        code=ErrorCode.TUNNEL_BUSY,
                        error="another session is open",
                        held_session_id=self.session_id,
                    )
                )
                return
            self.session_id = frame.session_id
            await self.send(TunnelReady(req_id=frame.req_id, session_id=frame.session_id))
        elif isinstance(frame, TunnelClose):
            await self._close_tunnel(frame)
        elif isinstance(frame, FileChunk):
            await self._upload_chunk(frame)
        elif isinstance(frame, FileAck):
            download = self.downloads.get(frame.channel_id)
            if download is not None:
                download.acked = max(download.acked, frame.offset)
                download.moved.set()
        elif isinstance(frame, FileUpload):
            await self._upload_start(frame)
        elif isinstance(frame, FileDownload):
            await self._download_start(frame)
        elif isinstance(frame, FileCancel):
            await self._file_cancel(frame)
        elif isinstance(frame, ChannelOpen):
            await self.send(
                ChannelOpened(
                    req_id=frame.req_id,
                    session_id=frame.session_id,
                    channel_id=frame.channel_id,
                    channel_type=frame.channel_type,
                )
            )
        elif isinstance(frame, ChannelClose):
            task = self.channels.get(frame.channel_id)
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await self.send(
                ChannelClosed(
                    req_id=frame.req_id, session_id=frame.session_id, channel_id=frame.channel_id
                )
            )
        elif isinstance(frame, ShellOpen):
            await self.send(
                TunnelError(
                    req_id=frame.req_id,
                    session_id=frame.session_id,
                    channel_id=frame.channel_id,
                    code=ErrorCode.NOT_IMPLEMENTED,
                    error="the simulated agent has no shell",
                )
            )
        elif isinstance(frame, Reconnect):
            self.reconnect_delay_s = frame.delay_ms / 1000
            await self.ws.close()
        else:  # error frames: a refused frame of ours
            self.process.counters.errors_received += 1

    def beat_every(self, interval_s: float, first_after_s: float = 0.0) -> None:
        """(Re)start the heartbeats: the first after ``first_after_s``, then every
        ``interval_s`` (never slower than the process's configured interval)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        interval_s = min(interval_s, self.process.config.heartbeat_interval_s)
        self._heartbeat = asyncio.create_task(self._beat(interval_s, first_after_s))

    async def _beat(self, interval_s: float, first_after_s: float) -> None:
        metrics = self.process.metrics
        if first_after_s > 0:
            await asyncio.sleep(first_after_s)
        while True:
            beat = Heartbeat(
                sent_at=datetime.now(UTC),
                mode="tunnel" if self.session_id else "heartbeat",
                session_id=self.session_id,
                metrics=metrics,
            )
            with contextlib.suppress(ConnectionClosed):
                await self.send(beat)
                self.process.counters.heartbeats += 1
            await asyncio.sleep(interval_s)

    async def _close_tunnel(self, frame: TunnelClose) -> None:
        if self.session_id != frame.session_id:
            await self.send(
                TunnelError(
                    req_id=frame.req_id,
                    session_id=frame.session_id,
                    code=ErrorCode.NO_SUCH_SESSION,
                    error="no such session",
                )
            )
            return
        tasks = [*self.channels.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for download in [*self.downloads.values()]:
            if download.task is not None:
                download.task.cancel()
        self.downloads.clear()
        self.uploads.clear()
        self.session_id = None
        await self.send(
            TunnelClosed(req_id=frame.req_id, session_id=frame.session_id, reason=frame.reason)
        )

    # ---------------------------------------------------------------- commands
    async def _command(self, frame: Terminal) -> None:
        words = (frame.command or " ".join(frame.argv or [])).split()
        if self.session_id != frame.session_id or frame.channel_id in self.channels:
            await self.send(
                TunnelError(
                    req_id=frame.req_id,
                    session_id=frame.session_id,
                    channel_id=frame.channel_id,
                    code=ErrorCode.NO_SUCH_SESSION
                    if self.session_id != frame.session_id
                    else ErrorCode.CHANNEL_EXISTS,
                    error="refused",
                )
            )
            return
        if len(words) < 2 or words[0] != "bench" or words[1] not in ("echo", "stream"):
            await self.send(
                TunnelError(
                    req_id=frame.req_id,
                    session_id=frame.session_id,
                    channel_id=frame.channel_id,
                    code=ErrorCode.INVALID_COMMAND,
                    error="the simulated agent runs 'bench echo' and 'bench stream TOTAL CHUNK'",
                )
            )
            return
        self.process.counters.commands += 1
        if words[1] == "echo" and frame.inline_result:
            # ended before the answer: output and exit travel in it
            assert frame.req_id is not None
            await self.ws.send(echo_answer_text(frame.req_id, frame.session_id, frame.channel_id))
            return
        await self.send(
            TerminalStarted(
                req_id=frame.req_id,
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                window_bytes=frame.window_bytes if words[1] == "stream" else None,
            )
        )
        if words[1] == "echo":  # a sender that reads no inline result: streamed, as before
            await self.ws.send(chunk_text(frame.session_id, frame.channel_id, 0, "b2sK"))
            await self.send(self._exit(frame, 1, ExitReason.EXITED, 0.0, 3))
            return
        total, chunk = int(words[2]), int(words[3])
        # without window_bytes the window counts nothing and never waits
        window = self.windows[frame.channel_id] = OutputWindow(frame.window_bytes)
        chunk = window.piece_bytes(chunk)
        task = asyncio.create_task(self._stream(frame, total, chunk, window))
        self.channels[frame.channel_id] = task

        def ended(_: object) -> None:
            self.channels.pop(frame.channel_id, None)
            self.windows.pop(frame.channel_id, None)

        task.add_done_callback(ended)

    @staticmethod
    def _exit(
        frame: Terminal, seq: int, reason: ExitReason, duration_s: float, stdout_bytes: int
    ) -> TerminalExit:
        return TerminalExit(
            session_id=frame.session_id,
            channel_id=frame.channel_id,
            seq=seq,
            reason=reason,
            exit_code=0 if reason == ExitReason.EXITED else None,
            duration_s=duration_s,
            stdout_bytes=stdout_bytes,
            stderr_bytes=0,
        )

    async def _stream(self, frame: Terminal, total: int, chunk: int, window: OutputWindow) -> None:
        started = time.monotonic()
        sent, seq = 0, 0
        reason = ExitReason.EXITED
        # a few pre-encoded payloads at different offsets of the pattern, reused in turn
        payloads = [
            base64.b64encode(pattern_bytes(i * 7919, chunk)).decode("ascii") for i in range(8)
        ]
        try:
            while sent < total:
                size = min(chunk, total - sent)
                if size == chunk:
                    data = payloads[seq % 8]
                else:
                    data = base64.b64encode(pattern_bytes(0, size)).decode("ascii")
                await window.room_for(chunk_cost(size))
                window.sent(seq, chunk_cost(size))
                await self.ws.send(chunk_text(frame.session_id, frame.channel_id, seq, data))
                sent += size
                seq += 1
                # a send into a socket with room never suspends: yield, as a real agent does
                # between pipe reads, or this loop starves every other agent of the process
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            reason = ExitReason.CANCELLED
        with contextlib.suppress(ConnectionClosed):
            await self.send(self._exit(frame, seq, reason, time.monotonic() - started, sent))

    # ---------------------------------------------------------------- files
    async def _upload_start(self, frame: FileUpload) -> None:
        self.uploads[frame.channel_id] = _Upload(frame=frame)
        await self.send(
            FileReady(
                req_id=frame.req_id,
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                offset=0,
                size=frame.size,
                window_bytes=FILE_WINDOW_BYTES,
                chunk_bytes=FILE_CHUNK_BYTES,
            )
        )

    async def _upload_chunk(self, frame: FileChunk) -> None:
        upload = self.uploads.get(frame.channel_id)
        if upload is None:
            return
        spec = upload.frame
        if frame.offset != upload.received:
            del self.uploads[frame.channel_id]
            await self.send(
                FileFailed(
                    session_id=spec.session_id,
                    channel_id=spec.channel_id,
                    code=ErrorCode.MALFORMED_FRAME,
                    error="chunk out of order",
                    offset=upload.received,
                )
            )
            return
        upload.digest.update(frame.data)
        upload.received += len(frame.data)
        await self.send(
            FileAck(session_id=spec.session_id, channel_id=spec.channel_id, offset=upload.received)
        )
        if upload.received < spec.size:
            return
        del self.uploads[frame.channel_id]
        digest = upload.digest.hexdigest()
        if digest != spec.sha256:
            await self.send(
                FileFailed(
                    session_id=spec.session_id,
                    channel_id=spec.channel_id,
                    code=ErrorCode.HASH_MISMATCH,
                    error="hash mismatch",
                    offset=0,
                )
            )
            return
        await self.send(
            FileDone(
                session_id=spec.session_id,
                channel_id=spec.channel_id,
                path=spec.path,
                size=spec.size,
                sha256=digest,
            )
        )

    async def _download_start(self, frame: FileDownload) -> None:
        if not frame.path.startswith(DOWNLOAD_PREFIX):
            await self.send(
                TunnelError(
                    req_id=frame.req_id,
                    session_id=frame.session_id,
                    channel_id=frame.channel_id,
                    code=ErrorCode.FILE_NOT_FOUND,
                    error="the simulated agent serves /bench/download/<size> only",
                )
            )
            return
        size = int(frame.path.removeprefix(DOWNLOAD_PREFIX))
        sha256 = await self.process.download_sha256(size)
        download = _Download(
            frame=frame, size=size, sha256=sha256, sent=frame.offset, acked=frame.offset
        )
        self.downloads[frame.channel_id] = download
        await self.send(
            FileReady(
                req_id=frame.req_id,
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                offset=frame.offset,
                size=size,
                sha256=sha256,
                window_bytes=FILE_WINDOW_BYTES,
                chunk_bytes=FILE_CHUNK_BYTES,
            )
        )
        download.task = asyncio.create_task(self._download_run(download))

    async def _download_run(self, download: _Download) -> None:
        spec = download.frame
        while download.sent < download.size:
            if download.sent - download.acked + FILE_CHUNK_BYTES > FILE_WINDOW_BYTES:
                download.moved.clear()
                await download.moved.wait()
                continue
            size = min(FILE_CHUNK_BYTES, download.size - download.sent)
            await self.send(
                FileChunk(
                    session_id=spec.session_id,
                    channel_id=spec.channel_id,
                    offset=download.sent,
                    data=pattern_bytes(download.sent, size),
                )
            )
            download.sent += size
            await asyncio.sleep(0)  # see _stream
        self.downloads.pop(spec.channel_id, None)
        await self.send(
            FileDone(
                session_id=spec.session_id,
                channel_id=spec.channel_id,
                path=spec.path,
                size=download.size,
                sha256=download.sha256,
            )
        )

    async def _file_cancel(self, frame: FileCancel) -> None:
        offset = 0
        if (upload := self.uploads.pop(frame.channel_id, None)) is not None:
            offset = upload.received
        elif (download := self.downloads.pop(frame.channel_id, None)) is not None:
            if download.task is not None:
                download.task.cancel()
            offset = download.acked
        else:
            return
        await self.send(
            FileFailed(
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                code=ErrorCode.SESSION_CLOSED,
                error="cancelled",
                offset=offset,
            )
        )


class SimProcess:
    """Every agent of this process, their connect loops and the status reporting."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.counters = Counters()
        self.metrics = _metrics()
        self.target = 0
        self.stopping = asyncio.Event()
        self.sockets: dict[int, ClientConnection] = {}
        self.beating: set[AgentSocket] = set()
        """Welcomed agents, whose heartbeats run."""
        self.beat_override_s: float | None = None
        self._back: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._first_connects = asyncio.Semaphore(config.connect_concurrency)
        self._sha_cache: dict[int, asyncio.Future[str]] = {}

    async def download_sha256(self, size: int) -> str:
        if size not in self._sha_cache:
            self._sha_cache[size] = asyncio.ensure_future(asyncio.to_thread(pattern_sha256, size))
        return await self._sha_cache[size]

    def welcomed(self, index: int) -> None:
        self._back.add(index)
        self.counters.back = len(self._back)

    def mark(self) -> None:
        """From now on ``back`` counts the distinct agents welcomed (a storm's return)."""
        self._back = set()
        self.counters.back = 0

    def beat_every(self, interval_s: float) -> None:
        self.beat_override_s = interval_s
        rng = random.Random(len(self.beating))
        for sock in self.beating:
            sock.beat_every(interval_s, first_after_s=rng.uniform(0, interval_s))

    def set_target(self, n: int) -> None:
        n = min(n, self.config.size)
        while self.target < n:
            index = self.target
            self._tasks.append(asyncio.create_task(self._agent(index), name=f"agent-{index}"))
            self.target += 1

    def _connect(self, url: str, index: int) -> Any:
        headers = {}
        if self.config.mode == "gurutunnel":
            headers["Authorization"] = f"Bearer {self.config.credentials[index]}"
        return connect(
            url,
            additional_headers=headers,
            user_agent_header="gurutunnel-agent/bench",
            open_timeout=10,
            ping_interval=AGENT_PING_INTERVAL_S,
            ping_timeout=AGENT_PING_TIMEOUT_S,
            close_timeout=5,
            max_size=AGENT_MAX_FRAME_BYTES,
            local_addr=(self.config.source_ip, 0),
        )

    async def _agent(self, index: int) -> None:
        """The real agent's connect loop (see the module contract)."""
        backoff = Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S, BACKOFF_FACTOR)
        urls = self.config.urls
        url_index = 0
        first = True
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            welcomed = False
            opened_at = loop.time()
            sock: AgentSocket | None = None
            self.counters.attempts += 1
            try:
                if first:
                    async with self._first_connects:
                        ws = await self._connect(urls[url_index], index)
                else:
                    ws = await self._connect(urls[url_index], index)
                first = False
                opened_at = loop.time()
                self.sockets[index] = ws
                self.counters.connections += 1
                try:
                    if self.config.mode == "bare":
                        self.counters.connected += 1
                        self.welcomed(index)
                        welcomed = True
                        await ws.wait_closed()
                    else:
                        sock = AgentSocket(ws, self, index)
                        await sock.serve()
                        welcomed = sock.welcome is not None
                finally:
                    self.sockets.pop(index, None)
                    if welcomed:
                        self.counters.connected -= 1
                    await ws.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counters.failures += 1
                if isinstance(exc, ConnectionRefusedError):
                    self.counters.refused += 1
                elif isinstance(exc, TimeoutError):
                    self.counters.timeouts += 1
                elif isinstance(exc, InvalidStatus):
                    self.counters.rejected += 1
            if self.stopping.is_set():
                return
            going_away = sock is not None and sock.reconnect_delay_s is not None
            if not welcomed or going_away:
                url_index = (url_index + 1) % len(urls)
            if welcomed and loop.time() - opened_at >= BACKOFF_RESET_AFTER_S:
                backoff.reset()
            delay = backoff.next_delay()
            if sock is not None and sock.reconnect_delay_s is not None:
                delay = max(min(sock.reconnect_delay_s, BACKOFF_MAX_S), delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stopping.wait()

    async def stop(self) -> None:
        self.stopping.set()
        sockets = list(self.sockets.values())
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def report(self) -> None:
        last: dict[str, int] = {}
        while True:
            snapshot = {**self.counters.snapshot(), "target": self.target}
            if snapshot != last:
                print(json.dumps({"event": "status", **snapshot}), flush=True)
                last = snapshot
            await asyncio.sleep(self.config.status_interval_s)


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def amain(config: SimConfig) -> None:
    process = SimProcess(config)
    reporter = asyncio.create_task(process.report())
    reader = await _stdin_lines()
    print(json.dumps({"event": "ready", "size": config.size}), flush=True)
    try:
        while True:
            line = await reader.readline()
            if not line:
                break  # the harness went away
            command = json.loads(line)
            if command.get("op") == "target":
                process.set_target(int(command["n"]))
            elif command.get("op") == "mark":
                process.mark()
            elif command.get("op") == "beat":
                process.beat_every(float(command["interval_s"]))
            elif command.get("op") == "stop":
                break
    finally:
        await process.stop()
        reporter.cancel()
        print(json.dumps({"event": "stopped"}), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m bench.simagent CONFIG.json")
    raise_nofile_limit()
    config = SimConfig.model_validate_json(Path(args[0]).read_text())
    # No automatic full collection in this load generator: with thousands of sockets CPython's
    # stop the process for up to a second, again and again as they are opened (measured: 11 of
    # 0.1-1.1 s per process in one storm), so the clients would stall and time out handshakes
    # on either side of a comparison. A process lives for one run; young collections still
    # free short-lived cycles. The gateway's own policy, without its periodic collections.
    stop_automatic_full_collections()
    asyncio.run(amain(config))


if __name__ == "__main__":
    main()
