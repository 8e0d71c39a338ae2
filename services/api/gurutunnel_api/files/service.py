"""File transfer inside a session: path and header checks, upload, download, audit.

Contract (the HTTP side is the README's "Inside a session", the wire side
``gurutunnel_protocol.messages.files`` and ``gurutunnel_agent.channels.files``):

- :func:`check_path` refuses (422 ``path_not_allowed``) before anything is sent a path that is
  empty, longer than ``MAX_FILE_PATH_CHARS``, holds NUL, is not absolute, or has a ``.`` or
  ``..`` component (``/`` and ``\\`` both separate components). The agent checks again against
  its allowlist, symlinks resolved (403 ``path_not_allowed``).
- Every transfer runs on a fresh ``channel_id``. The session's up subject is subscribed BEFORE
  the request (``file.upload`` / ``file.download`` on ``agent.<id>.cmd``, answered within
  ``file_start_timeout_s``), and one task (:class:`ChannelFeed`) reads it into a queue, keeping
  only that channel's ``file.*`` frames (plus ``tunnel.closed`` and bus drop markers).
  Memory stays bounded by the agent's window: the agent never has more than ``window_bytes``
  unacknowledged in flight, and the API acknowledges a download chunk only after the HTTP
  client took it.
- Refusals (``tunnel.error``) and failures (``file.failed``) map through
  :func:`..errors.file_refusal` (403 ``path_not_allowed``, 404 ``file_not_found``, 409
  ``file_exists``, 413 ``file_too_large``, 422 ``hash_mismatch``, 502 ``io_error``, 504
  ``agent_timeout``, ...); bus failures through :func:`..errors.bus_error_to_api`.
- Audit: one ``tunnel_audit`` row per transfer (``file.upload`` / ``file.download``), written and
  committed before the request is sent (no row: 503 ``database_unavailable`` and nothing is
  sent), completed at the end with the size, SHA-256 and resume offset the agent reported and
  the outcome (``done``, the error code, or ``client_gone``). The resume probe is not a transfer
  and writes no row.
- **Resume probe** (:func:`probe_upload_offset`): ``file.upload`` (``overwrite`` false), read
  ``file.ready.offset``, then ``file.cancel`` and wait (``file_cancel_wait_s``) for the agent's
  final frame, so the partial file's lock is released before the client's PUT arrives. A target
  that exists answers ``file_exists`` before any offset: the probe answers 0 (the PUT, with
  ``overwrite``, then sends the whole file and the API skips what the agent holds).
- **Upload** (:func:`upload`): with ``Content-Range`` its start must equal ``file.ready.offset``
  (else 409 ``conflict`` with ``X-Upload-Offset``); without it the body is the whole file and the
  bytes below the offset are read and dropped. The body is cut into ``chunk_bytes`` chunks,
  each published as ``file.chunk`` only when it keeps the unacknowledged bytes within
  ``window_bytes`` (waiting for ``file.ack``, at most ``file_idle_timeout_s`` per wait). After
  the last byte the API waits for ``file.done`` (``file_idle_timeout_s`` without any frame is
  504 ``agent_timeout``) and checks its size and SHA-256. A body shorter or longer than
  ``Content-Length`` is 422 ``validation_error``; a client that goes away raises
  :class:`ClientGone`. Whatever ends an upload early, ``file.cancel`` is sent and the agent's
  final frame awaited (bounded): the agent keeps the partial file for a resume.
- **Download** (:class:`Download`): ``open()`` sends ``file.download{offset}`` and returns
  ``file.ready`` (size, SHA-256 of the whole file). A ``Range`` start at or beyond the size
  (the agent refuses one beyond with ``malformed_frame``) is 416 ``range_not_satisfiable`` with
  ``Content-Range: bytes */<size>`` and ``X-Content-SHA256`` (learnt, when needed, from a second
  ``file.download`` at 0 that is cancelled at once). ``body()`` yields the chunks in order and
  publishes ``file.ack{offset}`` after each one is taken by the HTTP server; the chunk that
  completes the file is held back until ``file.done`` confirms size and SHA-256, so a file
  that changed is never delivered as a complete body. A gap, a ``file.failed``, frames dropped
  by the bus, the session's end or ``file_idle_timeout_s`` of silence raise
  :class:`TransferAborted` from inside the body: the server then cuts the connection and the
  client sees fewer bytes than ``Content-Length``. ``close()`` (always called, see the router)
  cancels an unfinished transfer on the agent and completes the audit row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gurutunnel_protocol import ErrorCode, new_id
from gurutunnel_protocol.messages import (
    FileAck,
    FileCancel,
    FileChunk,
    FileDone,
    FileDownload,
    FileFailed,
    FileReady,
    FileUpload,
    TunnelClosed,
    TunnelError,
)
from gurutunnel_protocol.messages.files import MAX_FILE_PATH_CHARS

from ..audit.models import AuditAction
from ..bus import BusError, FramesDropped, SessionSubscription
from ..errors import (
    AgentFailed,
    ApiError,
    FileRefused,
    Unprocessable,
    bus_error_to_api,
    file_refusal,
)
from ..work.service import SessionRef, WorkContext, begin_audit, complete_audit

log = logging.getLogger(__name__)

SHA256_HEADER = "X-Content-SHA256"
UPLOAD_OFFSET_HEADER = "X-Upload-Offset"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})")
_RANGE_RE = re.compile(r"bytes=(\d{1,19})-")
_WINDOWS_ABSOLUTE_RE = re.compile(r"[A-Za-z]:[\\/]")
_SEPARATORS_RE = re.compile(r"[\\/]")

CLIENT_GONE = "client_gone"
DONE = "done"


# ---------------------------------------------------------------- request checks
def _path_refused(message: str) -> Unprocessable:
    return Unprocessable(message, code=ErrorCode.PATH_NOT_ALLOWED)


def check_path(path: str) -> str:
    """``path`` if the API lets it reach the agent (see the module contract)."""
    if not path or len(path) > MAX_FILE_PATH_CHARS:
        raise _path_refused(f"the path must have 1 to {MAX_FILE_PATH_CHARS} characters")
    if "\x00" in path:
        raise _path_refused("the path must not contain NUL characters")
    if not (path.startswith("/") or _WINDOWS_ABSOLUTE_RE.match(path)):
        raise _path_refused("the path must be absolute")
    if any(part in (".", "..") for part in _SEPARATORS_RE.split(path)):
        raise _path_refused("the path must not contain '.' or '..' components")
    return path


@dataclass(frozen=True, slots=True)
class UploadSpec:
    """One PUT: the whole file is ``size`` bytes; the body holds ``length`` bytes from ``start``."""

    path: str
    size: int
    sha256: str
    start: int
    length: int
    overwrite: bool


def upload_spec(
    *,
    path: str,
    overwrite: bool,
    content_length: str | None,
    sha256: str | None,
    content_range: str | None,
) -> UploadSpec:
    """The PUT's headers checked: 411 without ``Content-Length``, 422 ``validation_error`` for a
    bad ``X-Content-SHA256`` or ``Content-Range``."""
    if content_length is None:
        raise FileRefused(411, ErrorCode.VALIDATION_ERROR, "Content-Length is required")
    if not content_length.isdigit() or len(content_length) > 19:
        raise Unprocessable("Content-Length must be a number of bytes")
    length = int(content_length)
    if sha256 is None or not _SHA256_RE.fullmatch(sha256):
        raise Unprocessable(f"{SHA256_HEADER} must be 64 lowercase hexadecimal characters")
    if content_range is None:
        return UploadSpec(path, length, sha256, 0, length, overwrite)
    match = _CONTENT_RANGE_RE.fullmatch(content_range.strip())
    if match is None:
        raise Unprocessable("Content-Range must be 'bytes <start>-<end>/<size>'")
    start, end, size = (int(g) for g in match.groups())
    if not start <= end == size - 1 or end - start + 1 != length:
        raise Unprocessable(
            "Content-Range must cover the rest of the file (end = size - 1) and match "
            "Content-Length"
        )
    return UploadSpec(path, size, sha256, start, length, overwrite)


def range_start(header: str | None) -> int | None:
    """The start of ``Range: bytes=<start>-``; None without a Range, or for a form this API does
    not serve (ignored, as RFC 9110 allows: the whole file is sent)."""
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    return None if match is None else int(match.group(1))


# ---------------------------------------------------------------- the channel's frames
@dataclass(frozen=True, slots=True)
class FeedLost:
    """The channel's frames can no longer be trusted or received (session closed, bus gone)."""

    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class FeedDropped:
    """The bus dropped frames of the session (maybe of this channel)."""

    count: int


FeedItem = FileChunk | FileAck | FileDone | FileFailed | FeedLost | FeedDropped


class ChannelFeed:
    """The ``file.*`` frames of one channel, read from the session subscription by one task."""

    def __init__(self, sub: SessionSubscription, channel_id: str) -> None:
        self._sub = sub
        self._channel_id = channel_id
        self._queue: asyncio.Queue[FeedItem] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(), name=f"file-feed-{channel_id}")

    async def _pump(self) -> None:
        async for item in self._sub:
            if isinstance(item, FramesDropped):
                self._queue.put_nowait(FeedDropped(item.count))
                continue
            frame = item.frame
            if isinstance(frame, TunnelClosed):
                self._queue.put_nowait(FeedLost(ErrorCode.SESSION_CLOSED, "the session closed"))
            elif (
                isinstance(frame, FileChunk | FileAck | FileDone | FileFailed)
                and frame.channel_id == self._channel_id
            ):
                self._queue.put_nowait(frame)
        self._queue.put_nowait(FeedLost(ErrorCode.BUS_UNAVAILABLE, "the message bus went away"))

    async def get(self, timeout_s: float) -> FeedItem | None:
        """The next item, or None after ``timeout_s`` without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None

    def get_nowait(self) -> FeedItem | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        await self._sub.close()


async def _open_feed(ctx: WorkContext, ref: SessionRef, channel_id: str) -> ChannelFeed:
    try:
        sub = await ctx.bus.subscribe_session(ref.session_id)
    except BusError as exc:
        raise bus_error_to_api(exc) from None
    return ChannelFeed(sub, channel_id)


async def _request(
    ctx: WorkContext, ref: SessionRef, frame: FileUpload | FileDownload
) -> FileReady | TunnelError:
    """The agent's answer to ``frame``: ``file.ready`` or its refusal; bus failures raised."""
    try:
        reply = await ctx.bus.request_agent(ref.agent_id, frame, ctx.settings.file_start_timeout_s)
    except BusError as exc:
        raise bus_error_to_api(exc) from None
    answer = reply.frame
    if isinstance(answer, TunnelError):
        return answer
    if not isinstance(answer, FileReady) or answer.channel_id != frame.channel_id:
        raise AgentFailed(f"unexpected answer from the agent ({answer.type})")
    return answer


async def _cancel(ctx: WorkContext, ref: SessionRef, channel_id: str) -> None:
    with contextlib.suppress(BusError):
        await ctx.bus.publish_session_down(
            ref.session_id, FileCancel(session_id=ref.session_id, channel_id=channel_id)
        )


async def _wait_final(feed: ChannelFeed, timeout_s: float) -> FileDone | FileFailed | None:
    """The agent's final frame of the channel, or None when it did not come within the bound."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        item = await feed.get(left)
        if isinstance(item, FileDone | FileFailed):
            return item
        if item is None or isinstance(item, FeedLost):
            return None
    return None


async def _cancel_and_wait(
    ctx: WorkContext, ref: SessionRef, channel_id: str, feed: ChannelFeed
) -> None:
    await _cancel(ctx, ref, channel_id)
    await _wait_final(feed, ctx.settings.file_cancel_wait_s)


def _lost(item: FeedLost) -> ApiError:
    return file_refusal(item.code, item.message)


# ---------------------------------------------------------------- upload
class ClientGone(Exception):
    """The HTTP client went away before the whole body arrived."""


async def probe_upload_offset(
    ctx: WorkContext, *, ref: SessionRef, path: str, size: int, sha256: str
) -> int:
    """How many bytes of this content the agent holds for ``path`` (see the module contract)."""
    channel_id = new_id()
    feed = await _open_feed(ctx, ref, channel_id)
    try:
        answer = await _request(
            ctx,
            ref,
            FileUpload(
                req_id=new_id(),
                session_id=ref.session_id,
                channel_id=channel_id,
                path=path,
                size=size,
                sha256=sha256,
                overwrite=False,
            ),
        )
        if isinstance(answer, TunnelError):
            if answer.code == ErrorCode.FILE_EXISTS:
                return 0
            raise file_refusal(answer.code, answer.error)
        await _cancel_and_wait(ctx, ref, channel_id, feed)
        return answer.offset
    except BaseException:
        # a late file.ready must not leave a transfer waiting on the agent
        await asyncio.shield(_cancel(ctx, ref, channel_id))
        raise
    finally:
        await asyncio.shield(feed.close())


@dataclass
class _Outcome:
    reason: str = "internal_error"
    columns: dict[str, Any] = field(default_factory=dict)


async def upload(
    ctx: WorkContext, *, ref: SessionRef, spec: UploadSpec, body: AsyncIterator[bytes]
) -> FileDone:
    """Stream ``body`` to the agent (see the module contract); the agent's ``file.done``."""
    channel_id = new_id()
    audit_id = await begin_audit(
        ctx.sessionmaker,
        ref=ref,
        action=AuditAction.FILE_UPLOAD,
        channel_id=channel_id,
        detail={"overwrite": spec.overwrite},
        columns={"file_path": spec.path, "file_size": spec.size, "file_sha256": spec.sha256},
    )
    outcome = _Outcome()
    feed: ChannelFeed | None = None
    agent_ended = False
    try:
        feed = await _open_feed(ctx, ref, channel_id)
        answer = await _request(
            ctx,
            ref,
            FileUpload(
                req_id=new_id(),
                session_id=ref.session_id,
                channel_id=channel_id,
                path=spec.path,
                size=spec.size,
                sha256=spec.sha256,
                overwrite=spec.overwrite,
            ),
        )
        if isinstance(answer, TunnelError):
            agent_ended = True
            raise file_refusal(answer.code, answer.error)
        outcome.columns["file_offset"] = answer.offset
        if spec.start and spec.start != answer.offset:
            raise FileRefused(
                409,
                ErrorCode.CONFLICT,
                f"the agent holds {answer.offset} bytes of this upload; the body starts at "
                f"{spec.start}",
                headers={UPLOAD_OFFSET_HEADER: str(answer.offset)},
            )
        sender = _UploadSender(ctx, ref, channel_id, feed, answer, spec)
        try:
            done = await sender.run(body)
        finally:
            agent_ended = sender.agent_ended
        outcome.reason = DONE
        outcome.columns |= {"file_size": done.size, "file_sha256": done.sha256}
        return done
    except ApiError as exc:
        outcome.reason = exc.code.value
        raise
    except ClientGone:
        outcome.reason = CLIENT_GONE
        raise
    except asyncio.CancelledError:
        outcome.reason = "cancelled"
        raise
    finally:
        if feed is not None:
            if not agent_ended and outcome.reason != DONE:
                # the partial file stays on the agent; its lock is released once it answers
                await asyncio.shield(_cancel_and_wait(ctx, ref, channel_id, feed))
            await asyncio.shield(feed.close())
        await asyncio.shield(
            complete_audit(
                ctx.sessionmaker, audit_id, reason=outcome.reason, columns=outcome.columns
            )
        )


class _UploadSender:
    """The body of one upload cut into chunks within the agent's window."""

    def __init__(
        self,
        ctx: WorkContext,
        ref: SessionRef,
        channel_id: str,
        feed: ChannelFeed,
        ready: FileReady,
        spec: UploadSpec,
    ) -> None:
        self.ctx = ctx
        self.ref = ref
        self.channel_id = channel_id
        self.feed = feed
        self.ready = ready
        self.spec = spec
        self.acked = ready.offset
        self.sent = ready.offset
        self.done: FileDone | None = None
        self.agent_ended = False
        self.idle_s = ctx.settings.file_idle_timeout_s

    async def run(self, body: AsyncIterator[bytes]) -> FileDone:
        chunk_bytes = self.ready.chunk_bytes
        pos = self.spec.start  # the file offset of the next body byte
        received = 0
        buf = bytearray()
        async for piece in body:
            received += len(piece)
            if received > self.spec.length:
                raise Unprocessable("the body is longer than its Content-Length")
            if pos < self.ready.offset:
                # the agent holds these bytes already: read and dropped
                skip = min(len(piece), self.ready.offset - pos)
                pos += skip
                piece = piece[skip:]
            if not piece:
                continue
            pos += len(piece)
            buf += piece
            while len(buf) >= chunk_bytes:
                await self._send(bytes(buf[:chunk_bytes]))
                del buf[:chunk_bytes]
        if received < self.spec.length:
            raise Unprocessable("the body is shorter than its Content-Length")
        if buf:
            await self._send(bytes(buf))
        return await self._finish()

    def _take(self, item: FeedItem) -> None:
        if isinstance(item, FileAck):
            self.acked = max(self.acked, item.offset)
        elif isinstance(item, FileDone):
            self.agent_ended = True
            self.done = item
        elif isinstance(item, FileFailed):
            self.agent_ended = True
            raise file_refusal(item.code, item.error)
        elif isinstance(item, FeedLost):
            raise _lost(item)
        # acks are cumulative: a dropped one is made good by the next; a dropped final frame
        # shows as silence, which the idle bound ends

    async def _send(self, data: bytes) -> None:
        while True:
            while (item := self.feed.get_nowait()) is not None:
                self._take(item)
            if self.done is not None:
                raise AgentFailed("the agent finished the upload before it had every byte")
            if self.sent + len(data) - self.acked <= self.ready.window_bytes:
                break
            waited = await self.feed.get(self.idle_s)
            if waited is None:
                raise FileRefused(
                    504,
                    ErrorCode.AGENT_TIMEOUT,
                    f"no file.ack from the agent for {self.idle_s:g} s",
                )
            self._take(waited)
        try:
            await self.ctx.bus.publish_session_down(
                self.ref.session_id,
                FileChunk(
                    session_id=self.ref.session_id,
                    channel_id=self.channel_id,
                    offset=self.sent,
                    data=data,
                ),
            )
        except BusError as exc:
            raise bus_error_to_api(exc) from None
        self.sent += len(data)

    async def _finish(self) -> FileDone:
        while self.done is None:
            item = await self.feed.get(self.idle_s)
            if item is None:
                raise FileRefused(
                    504,
                    ErrorCode.AGENT_TIMEOUT,
                    f"no file.done from the agent for {self.idle_s:g} s after the last byte",
                )
            self._take(item)
        done = self.done
        if done.size != self.spec.size or done.sha256 != self.spec.sha256:
            raise AgentFailed("the agent reported another size or SHA-256 than the upload's")
        return done


# ---------------------------------------------------------------- download
class TransferAborted(Exception):
    """A download failed after its headers went out: the response must be cut short."""


class Download:
    """One ``GET .../files`` (see the module contract)."""

    def __init__(self, ctx: WorkContext, *, ref: SessionRef, path: str, start: int | None) -> None:
        self.ctx = ctx
        self.ref = ref
        self.path = path
        self.start = start or 0
        self.channel_id = new_id()
        self.ready: FileReady | None = None
        self.outcome = _Outcome(reason=CLIENT_GONE)
        self.agent_ended = False
        self._feed: ChannelFeed | None = None
        self._audit_id: int | None = None
        self._closed = False

    async def open(self) -> FileReady:
        """Audit, subscribe, request; ``file.ready`` or the refusal raised (then closed)."""
        self._audit_id = await begin_audit(
            self.ctx.sessionmaker,
            ref=self.ref,
            action=AuditAction.FILE_DOWNLOAD,
            channel_id=self.channel_id,
            detail=None,
            columns={"file_path": self.path, "file_offset": self.start},
        )
        try:
            self._feed = await _open_feed(self.ctx, self.ref, self.channel_id)
            answer = await _request(self.ctx, self.ref, self._frame(self.channel_id, self.start))
            if isinstance(answer, TunnelError):
                self.agent_ended = True
                if answer.code == ErrorCode.MALFORMED_FRAME and self.start > 0:
                    # the agent refuses an offset beyond the end: learn the size for the 416
                    raise await self._not_satisfiable(None)
                raise file_refusal(answer.code, answer.error)
            self.ready = answer
            self.outcome.columns |= {"file_size": answer.size, "file_sha256": answer.sha256}
            if self.start > 0 and self.start >= answer.size:
                raise await self._not_satisfiable(answer)
            return answer
        except BaseException as exc:
            self.outcome.reason = exc.code.value if isinstance(exc, ApiError) else "cancelled"
            await asyncio.shield(self.close())
            raise

    def _frame(self, channel_id: str, offset: int) -> FileDownload:
        return FileDownload(
            req_id=new_id(),
            session_id=self.ref.session_id,
            channel_id=channel_id,
            path=self.path,
            offset=offset,
        )

    async def _not_satisfiable(self, ready: FileReady | None) -> ApiError:
        if ready is None:
            probe_channel = new_id()
            with contextlib.suppress(ApiError):
                answer = await _request(self.ctx, self.ref, self._frame(probe_channel, 0))
                if isinstance(answer, FileReady):
                    ready = answer
                    await _cancel(self.ctx, self.ref, probe_channel)
        headers = {}
        if ready is not None and ready.sha256 is not None:
            headers = {"Content-Range": f"bytes */{ready.size}", SHA256_HEADER: ready.sha256}
        return FileRefused(
            416,
            ErrorCode.RANGE_NOT_SATISFIABLE,
            f"the range starts at {self.start}, at or beyond the file's size",
            headers=headers,
        )

    async def body(self) -> AsyncIterator[bytes]:
        """The file's bytes from ``start``; raises :class:`TransferAborted` on any failure."""
        ready, feed = self.ready, self._feed
        assert ready is not None
        assert feed is not None
        expected = self.start
        held: bytes | None = None  # the chunk completing the file, held until file.done
        idle_s = self.ctx.settings.file_idle_timeout_s
        while True:
            item = await feed.get(idle_s)
            if item is None:
                self._abort(ErrorCode.AGENT_TIMEOUT, f"no frame from the agent for {idle_s:g} s")
            elif isinstance(item, FileChunk):
                data = item.data
                end = item.offset + len(data)
                if end <= expected:
                    continue  # a duplicate
                if item.offset > expected:
                    self._abort(
                        ErrorCode.AGENT_ERROR, f"gap: chunk at {item.offset}, expected {expected}"
                    )
                data = data[expected - item.offset :]
                if end > ready.size or held is not None:
                    self._abort(ErrorCode.AGENT_ERROR, "bytes beyond the announced size")
                if end == ready.size:
                    held = data
                    expected = end
                    continue
                yield data
                expected = end
                await self._ack(expected)
            elif isinstance(item, FileDone):
                self.agent_ended = True
                if expected != ready.size or item.size != ready.size or item.sha256 != ready.sha256:
                    self._abort(
                        ErrorCode.HASH_MISMATCH, "the agent ended with another size or SHA-256"
                    )
                self.outcome.reason = DONE
                if held is not None:
                    yield held
                return
            elif isinstance(item, FileFailed):
                self.agent_ended = True
                self._abort(item.code, item.error)
            elif isinstance(item, FeedLost):
                self._abort(item.code, item.message)
            elif isinstance(item, FeedDropped):
                self._abort(ErrorCode.AGENT_ERROR, f"the bus dropped {item.count} frames")

    def _abort(self, code: ErrorCode, message: str) -> None:
        self.outcome.reason = code.value
        log.warning(
            "download aborted after its headers",
            extra={"session_id": self.ref.session_id, "channel_id": self.channel_id, "code": code},
        )
        raise TransferAborted(f"{code.value}: {message}")

    async def _ack(self, offset: int) -> None:
        try:
            await self.ctx.bus.publish_session_down(
                self.ref.session_id,
                FileAck(session_id=self.ref.session_id, channel_id=self.channel_id, offset=offset),
            )
        except BusError as exc:
            self._abort(exc.code, "the acknowledgement could not be sent")

    async def close(self) -> None:
        """Cancel an unfinished transfer on the agent, close the feed, complete the audit."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._feed is not None:
                if not self.agent_ended and self.outcome.reason != DONE:
                    await _cancel(self.ctx, self.ref, self.channel_id)
                await self._feed.close()
        finally:
            if self._audit_id is not None:
                await complete_audit(
                    self.ctx.sessionmaker,
                    self._audit_id,
                    reason=self.outcome.reason,
                    columns=self.outcome.columns,
                )
