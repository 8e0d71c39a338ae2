"""File transfers on a file channel: the path policy, an upload and a download runtime.

Contract (the wire side is ``gurutunnel_protocol.messages.files`` and docs/protocol.md "Files"):

- :func:`resolve_file_path` is the path policy. A path must be absolute, free of NUL and of
  ``..`` components, and name a file (no trailing separator). The real path of its parent
  directory (symlinks resolved) must lie inside the real path of an allowlist root; the final
  component must not be a symlink (and is opened with ``O_NOFOLLOW`` relative to the parent's
  directory descriptor); a file to read must be a regular file, and so must an existing upload
  target. It returns ``<real parent>/<name>`` or raises :class:`FileTransferError`:
  ``path_not_allowed`` (every policy refusal), ``file_not_found`` (a missing file to read, or a
  missing parent directory *inside* the allowlist: nothing outside it is ever probed),
  ``io_error`` (the file cannot be inspected).
- Both runtimes are used the same way by the client: ``await start()`` answers the request with
  exactly one frame, ``file.ready`` (returns True) or ``tunnel.error`` echoing ``req_id``
  (returns False); after a ``file.ready``, ``await run()`` ends with exactly one ``file.done``
  or ``file.failed``, whatever happens. :meth:`serve` does both. ``cancel()`` may be called at
  any time (``file.cancel``, ``channel.close``, ``tunnel.close``, socket loss) and makes the
  pending step end promptly (``request_stop(reason)`` / ``kill_now()`` are the same, in the
  vocabulary of the client's other channels; ``pid`` is None). Frames go out through the
  injected ``send`` (the client's one serialized send path); if it raises, the runtime stops
  sending and ends quietly.
- Blocking filesystem work (resolve, open, hash, read, write, fsync, rename) runs in a worker
  thread (of the injected ``executor``, else the loop's default one); a descriptor is closed
  only when no worker call still uses it. ``start()``'s preparation (resolve, open, resume
  re-hash, download hash) is bounded by ``FileLimits.prepare_timeout_s`` when set: past it the
  request is answered ``tunnel.error{agent_timeout}`` and a thread still hung in the filesystem
  releases its descriptors when it returns.
- ``abandon(reason)`` sends the one final frame on behalf of a task the client had to cancel
  (best effort; nothing if one was sent already).
- **Upload** (:class:`UploadChannel`): ``size <= max_file_bytes``; the target must not exist
  unless ``overwrite``. Bytes go to ``<dir>/.<name>.gtpart-<sha256[:16]>`` (``O_CREAT |
  O_NOFOLLOW``, mode 0600, ``flock``-ed so two uploads of the same content to the same path never
  interleave). An existing partial file (an interrupted upload of the same content) is resumed
  at its size after re-hashing it; one larger than ``size`` is truncated and the upload starts
  over. ``file.chunk`` frames:

  * ``offset`` == the end of the bytes received so far: accepted;
  * bytes entirely below that end (a re-sent duplicate): ignored; a chunk straddling the end:
    only its part beyond the end is used;
  * ``offset`` beyond the end (a gap), bytes beyond ``size``, or a chunk before ``file.ready``:
    ``file.failed{malformed_frame}``;
  * more than ``window_bytes`` received beyond the last acknowledged byte:
    ``file.failed{rate_limited}``.

  After each batch of writes the agent sends ``file.ack{offset}`` (bytes written with
  ``pwrite``; ``fdatasync`` every ``fsync_every_bytes`` and at the end). When ``size`` bytes
  are in, their SHA-256 (computed while writing, the resumed prefix re-hashed at start) must
  equal ``sha256``: then the partial file is fsynced and moved into place atomically (without
  ``overwrite``: ``link`` + ``unlink``, so a target that appeared meanwhile is never clobbered;
  with ``overwrite``: ``os.replace``, keeping the replaced file's permission bits), the directory
  is fsynced and ``file.done`` sent. On a mismatch the partial file is removed and
  ``file.failed{hash_mismatch}`` sent. A new file gets mode 0600.
- **Download** (:class:`DownloadChannel`): the file is opened ``O_NOFOLLOW``, must be regular
  and ``<= max_file_bytes``; ``offset > size`` is refused ``malformed_frame``. Its SHA-256 is
  computed first, then ``file.ready{offset, size, sha256}`` is sent, then ``file.chunk`` frames
  from ``offset``, never more than ``window_bytes`` beyond the highest ``file.ack`` (passed in
  with :meth:`DownloadChannel.ack`; an ack beyond the bytes sent is ``malformed_frame``). When
  all is sent, the hash of the bytes before ``offset`` plus the bytes sent must equal the
  announced digest and the file's size and mtime must be unchanged, else
  ``file.failed{hash_mismatch}`` (the file changed); then ``file.done``. ``file.done`` does not
  wait for the last acks: the receiver checks size and digest itself.
- Codes of ``file.failed`` (no code was added to the protocol):

  ===================  ============================================================
  ``hash_mismatch``    upload: wrong digest (partial removed); download: file changed
  ``io_error``         a read, write, fsync or rename failed
  ``file_exists``      upload without overwrite: the target appeared meanwhile
                       (the complete partial file is kept; a retry resumes at ``size``)
  ``malformed_frame``  a gap, bytes beyond ``size``, a chunk before ready, an ack
                       beyond the bytes sent
  ``rate_limited``     the uploader exceeded ``window_bytes``
  ``agent_timeout``    no ``file.chunk`` (upload) / no window-opening ``file.ack``
                       (download) for ``ack_timeout_s``
  ``session_closed``   ``cancel()``: ``file.cancel``, ``channel.close``, session end
  ===================  ============================================================

  An upload's ``file.failed`` carries ``offset`` = the bytes kept (fsynced) in its partial file
  (0 after ``hash_mismatch``); a download's carries the highest acknowledged offset. Only
  ``hash_mismatch`` removes the partial file; every other failure keeps it for a resume.
- A ``cancel()`` before ``file.ready`` was sent answers the request
  ``tunnel.error{session_closed}``. Where ``O_NOFOLLOW`` or ``dir_fd`` calls are unavailable
  (Windows) :data:`FILES_SUPPORTED` is False and every request is refused ``not_implemented``.
- Known limit: a concurrent rename of a directory *between* the resolution of the parent and
  the opening of its descriptor is not detected (the final component is race-free).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import stat
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, TypeVar

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
from gurutunnel_protocol.messages.files import MAX_FILE_PATH_CHARS

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

T = TypeVar("T")

Send = Callable[[AgentToServer], Awaitable[None]]
"""Send one frame through the client's serialized send path."""

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

MAX_CHUNK_BYTES = 512 * KIB
"""Largest ``chunk_bytes``: base64 (4/3) plus the JSON envelope must fit a 1 MiB frame."""

PARTIAL_MARKER = ".gtpart-"

_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)

FILES_SUPPORTED = bool(_O_NOFOLLOW) and os.open in os.supports_dir_fd
"""False where the race-free primitives this module relies on are missing (Windows)."""

_HASH_BLOCK_BYTES = 1 * MIB
_MAX_ERROR_CHARS = 1024


def default_file_allowlist() -> list[Path]:
    """The same default as the agent's ``cwd_allowlist``: home and the system temp directory."""
    return [Path.home(), Path(tempfile.gettempdir())]


@dataclass(frozen=True)
class FileLimits:
    """Limits and timeouts of file transfers (each maps to an ``AgentSettings`` field)."""

    max_file_bytes: int = 2 * GIB
    chunk_bytes: int = 256 * KIB
    window_bytes: int = 4 * MIB
    ack_timeout_s: float = 30.0
    fsync_every_bytes: int = 8 * MIB
    prepare_timeout_s: float | None = None
    """Bound on ``start()``'s filesystem work (None: unbounded)."""

    def __post_init__(self) -> None:
        if self.max_file_bytes < 0:
            raise ValueError("max_file_bytes must be >= 0")
        if not 0 < self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}")
        if self.window_bytes < self.chunk_bytes:
            raise ValueError("window_bytes must be >= chunk_bytes")
        if self.ack_timeout_s <= 0:
            raise ValueError("ack_timeout_s must be > 0")
        if self.fsync_every_bytes <= 0:
            raise ValueError("fsync_every_bytes must be > 0")
        if self.prepare_timeout_s is not None and self.prepare_timeout_s <= 0:
            raise ValueError("prepare_timeout_s must be > 0")


class FileTransferError(Exception):
    """A refused or failed transfer; ``code`` goes back in ``tunnel.error`` or ``file.failed``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Aborted(Exception):
    """Worker-thread work stopped because the transfer was cancelled."""


def _refuse(message: str) -> FileTransferError:
    return FileTransferError(ErrorCode.PATH_NOT_ALLOWED, message)


def _io_error(what: str, exc: OSError) -> FileTransferError:
    return FileTransferError(ErrorCode.IO_ERROR, f"{what}: {exc.strerror or type(exc).__name__}")


def _inside_allowlist(real: Path, allowlist: Sequence[Path]) -> bool:
    for root in allowlist:
        try:
            root_real = root.resolve(strict=False)
        except (OSError, RuntimeError, ValueError):
            continue
        if real.is_relative_to(root_real):
            return True
    return False


def resolve_file_path(path: str, allowlist: Sequence[Path], *, for_write: bool) -> Path:
    """``<real parent>/<name>`` for ``path`` under the policy above, or FileTransferError.

    Blocking (it touches the filesystem): the runtimes call it in a worker thread.
    """
    if "\x00" in path:
        raise _refuse("the path must not contain NUL characters")
    if not allowlist:
        raise _refuse("no file path is allowed on this agent")
    pure = PurePath(path)
    if not pure.is_absolute():
        raise _refuse("the path must be absolute")
    if ".." in pure.parts or ".." in path.split(os.sep):
        raise _refuse("the path must not contain '..' components")
    if path.endswith(os.sep) or path.rsplit(os.sep, 1)[-1] in ("", ".") or not pure.name:
        raise _refuse("the path must name a file")
    try:
        # strict=False resolves every existing component (symlinks included) and keeps the
        # missing rest, so a missing directory is judged by where it would be
        real_parent = Path(path).parent.resolve(strict=False)
    except (OSError, RuntimeError, ValueError):
        raise _refuse("the directory cannot be resolved") from None
    if not _inside_allowlist(real_parent, allowlist):
        raise _refuse("the path is outside the agent's allowlist")
    if not real_parent.is_dir():
        raise FileTransferError(ErrorCode.FILE_NOT_FOUND, "the directory does not exist")
    target = real_parent / pure.name
    if len(str(target)) > MAX_FILE_PATH_CHARS:
        raise _refuse("the path is too long")
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        if for_write:
            return target
        raise FileTransferError(ErrorCode.FILE_NOT_FOUND, "no such file") from None
    except OSError as exc:
        raise _io_error("cannot inspect the file", exc) from None
    if stat.S_ISLNK(st.st_mode):
        raise _refuse("the final path component is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise _refuse("the path is not a regular file")
    return target


def partial_name(name: str, sha256: str) -> str:
    """The partial file of an upload of content ``sha256`` to ``name`` (same directory)."""
    return f".{name}{PARTIAL_MARKER}{sha256[:16]}"


class _Worker:
    """Blocking calls in a worker thread; descriptors are released only when none runs."""

    def __init__(self, executor: Executor | None = None) -> None:
        self.abort = threading.Event()
        self._executor = executor
        self._inflight: asyncio.Future[Any] | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().run_in_executor(
            self._executor, fn, *args
        )
        self._inflight = fut
        # shielded: a cancelled caller must not free a descriptor the thread still uses
        return await asyncio.shield(fut)

    def when_idle(self, release: Callable[[], None]) -> None:
        fut = self._inflight
        if fut is None or fut.done():
            release()
            return
        self.abort.set()

        def done(f: asyncio.Future[Any]) -> None:
            if not f.cancelled():
                f.exception()  # retrieved: the caller that wanted it is gone
            release()

        fut.add_done_callback(done)


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_dir(real_dir: Path) -> int:
    try:
        return os.open(real_dir, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError as exc:
        raise _io_error("cannot open the directory", exc) from None


def _open_final(name: str, dir_fd: int, flags: int, mode: int = 0o600) -> int:
    try:
        return os.open(name, flags | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK, mode, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FileTransferError(ErrorCode.FILE_NOT_FOUND, "no such file") from None
    except OSError as exc:
        if exc.errno in (getattr(os, "ELOOP", -1), getattr(os, "EMLINK", -1)):
            raise _refuse("the final path component is a symbolic link") from None
        raise _io_error("cannot open the file", exc) from None


def _read_exactly(fd: int, size: int, at: int) -> bytes:
    """``size`` bytes at ``at``, fewer only at end of file."""
    parts: list[bytes] = []
    while size > 0:
        data = os.pread(fd, size, at)
        if not data:
            break
        parts.append(data)
        size -= len(data)
        at += len(data)
    return b"".join(parts)


def _fdatasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


def _clip(text: str) -> str:
    return text[:_MAX_ERROR_CHARS]


class _FileChannel:
    """What uploads and downloads share: the answer, the one final frame, the worker."""

    def __init__(
        self,
        frame: FileUpload | FileDownload,
        send: Send,
        *,
        file_allowlist: Sequence[Path] | None,
        limits: FileLimits,
        executor: Executor | None = None,
    ) -> None:
        self.frame = frame
        self.session_id = frame.session_id
        self.channel_id = frame.channel_id
        self.limits = limits
        self.allowlist = (
            list(file_allowlist) if file_allowlist is not None else default_file_allowlist()
        )
        self.result: FileDone | FileFailed | TunnelError | None = None
        """The frame that ended the transfer (``tunnel.error`` if it never became ready)."""
        self._send = send
        self._worker = _Worker(executor)
        self._broken = False
        self._ready = False
        self._stop: tuple[ErrorCode, str] | None = None
        self._wake = asyncio.Event()
        self._dir_fd: int | None = None
        self._fd: int | None = None
        self._target: Path | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def finished(self) -> bool:
        return self.result is not None

    def cancel(self, reason: str = "cancelled") -> None:
        """End the transfer promptly with ``session_closed`` (an upload keeps its partial)."""
        self._set_stop(ErrorCode.SESSION_CLOSED, f"transfer cancelled: {reason}")
        self._worker.abort.set()

    # the stop vocabulary of the client's other channels, so it can stop every kind alike
    @property
    def pid(self) -> int | None:
        return None

    def request_stop(self, reason: ExitReason) -> None:
        """``cancel`` with the client's stop reason (``cancelled``, ``session_closed``, ...)."""
        self.cancel(reason.value)

    def kill_now(self) -> None:
        """Nothing to kill: the same as ``cancel`` (descriptors close once no thread uses them)."""
        self.cancel("stopped")

    async def serve(self) -> None:
        """``start`` then, if ready, ``run``: the whole life of the channel in one task."""
        if await self.start():
            await self.run()

    async def start(self) -> bool:
        raise NotImplementedError

    async def abandon(self, reason: ExitReason) -> None:
        """The final frame on behalf of a task that was cancelled (best effort, at most one)."""
        self.cancel(reason.value)
        self._release()
        if self.result is not None:
            return
        if not self._ready:
            await self._refuse_request(ErrorCode.SESSION_CLOSED, self._stop_message())
        else:
            await self._fail(ErrorCode.SESSION_CLOSED, self._stop_message(), self._kept_offset())

    def _stop_message(self) -> str:
        return self._stop[1] if self._stop is not None else "transfer cancelled"

    def _kept_offset(self) -> int:
        """The offset a ``file.failed`` reports (see module docstring)."""
        raise NotImplementedError

    async def _prepare_bounded(self, prepare: Callable[[], None]) -> None:
        """``prepare`` in the worker, bounded by ``prepare_timeout_s`` (agent_timeout)."""
        bound = self.limits.prepare_timeout_s
        if bound is None:
            await self._worker.call(prepare)
            return
        try:
            async with asyncio.timeout(bound):
                await self._worker.call(prepare)
        except TimeoutError:
            # the thread goes on (it cannot be interrupted); _release closes its descriptors
            # once it returns, and the abort flag stops a hash between blocks
            raise FileTransferError(
                ErrorCode.AGENT_TIMEOUT, f"the file could not be prepared within {bound:g} s"
            ) from None

    async def run(self) -> None:
        raise NotImplementedError

    def _set_stop(self, code: ErrorCode, message: str) -> None:
        if self._stop is None:
            self._stop = (code, message)
        self._wake.set()

    async def _emit(self, frame: AgentToServer) -> None:
        if self._broken:
            return
        try:
            await self._send(frame)
        except Exception as exc:
            # the socket is gone; the client ends the channel, nothing more can be delivered
            self._broken = True
            self._set_stop(ErrorCode.SESSION_CLOSED, "transfer cancelled: connection lost")
            log.warning(
                "file channel undeliverable; stopping",
                extra={"channel_id": self.channel_id, "error": type(exc).__name__},
            )

    async def _refuse_request(self, code: ErrorCode, message: str) -> bool:
        self._release()
        frame = TunnelError(
            req_id=self.frame.req_id,
            session_id=self.session_id,
            channel_id=self.channel_id,
            code=code,
            error=_clip(message),
        )
        self.result = frame
        await self._emit(frame)
        return False

    async def _finish(self, frame: FileDone | FileFailed) -> None:
        if self.result is not None:
            return
        self.result = frame
        await self._emit(frame)

    async def _fail(self, code: ErrorCode, message: str, offset: int) -> None:
        await self._finish(
            FileFailed(
                session_id=self.session_id,
                channel_id=self.channel_id,
                code=code,
                error=_clip(message),
                offset=offset,
            )
        )

    def _release(self) -> None:
        def close() -> None:
            fd, dir_fd = self._fd, self._dir_fd
            self._fd = self._dir_fd = None
            _close_fd(fd)
            _close_fd(dir_fd)

        self._worker.when_idle(close)

    async def _wait_for_peer(self, what: str) -> None:
        """Wait for the next frame of the peer (or a stop), bounded by ``ack_timeout_s``."""
        try:
            async with asyncio.timeout(self.limits.ack_timeout_s):
                await self._wake.wait()
        except TimeoutError:
            self._set_stop(
                ErrorCode.AGENT_TIMEOUT, f"no {what} for {self.limits.ack_timeout_s:g} s"
            )
        self._wake.clear()


class UploadChannel(_FileChannel):
    """Receive ``file.upload`` into its target (see module docstring)."""

    frame: FileUpload

    def __init__(
        self,
        frame: FileUpload,
        send: Send,
        *,
        file_allowlist: Sequence[Path] | None = None,
        limits: FileLimits = FileLimits(),
        executor: Executor | None = None,
    ) -> None:
        super().__init__(
            frame, send, file_allowlist=file_allowlist, limits=limits, executor=executor
        )
        self._queue: deque[bytes] = deque()
        self._received_end = 0
        """End of the bytes accepted (queued or written)."""
        self._written = 0
        """End of the bytes written to the partial file (and acknowledged)."""
        self._synced = 0
        self._hasher = hashlib.sha256()
        self._part_name = partial_name(PurePath(frame.path).name, frame.sha256)

    @property
    def offset(self) -> int:
        """Bytes written to the partial file."""
        return self._written

    def _kept_offset(self) -> int:
        return self._synced

    async def start(self) -> bool:
        """Answer ``file.ready`` (resume offset) or ``tunnel.error``; True when ready."""
        if not FILES_SUPPORTED:
            return await self._refuse_request(
                ErrorCode.NOT_IMPLEMENTED, "file transfers are not supported on this platform"
            )
        if self.frame.size > self.limits.max_file_bytes:
            return await self._refuse_request(
                ErrorCode.FILE_TOO_LARGE,
                f"the file is larger than the agent's limit of {self.limits.max_file_bytes} bytes",
            )
        try:
            await self._prepare_bounded(self._prepare)
        except FileTransferError as exc:
            return await self._refuse_request(exc.code, exc.message)
        except _Aborted:
            pass
        except BaseException:
            self._release()  # the task was cancelled outright: no answer, no descriptor left
            raise
        if self._stop is not None:
            return await self._refuse_request(ErrorCode.SESSION_CLOSED, self._stop[1])
        self._received_end = self._written
        self._ready = True
        await self._emit(
            FileReady(
                req_id=self.frame.req_id,
                session_id=self.session_id,
                channel_id=self.channel_id,
                offset=self._written,
                size=self.frame.size,
                window_bytes=self.limits.window_bytes,
                chunk_bytes=self.limits.chunk_bytes,
            )
        )
        return True

    def receive(self, chunk: FileChunk) -> None:
        """Take one ``file.chunk`` (never blocks: the writer task does the I/O)."""
        if self._stop is not None:
            return
        if not self._ready:
            self._set_stop(ErrorCode.MALFORMED_FRAME, "file.chunk before file.ready")
            return
        data, offset = chunk.data, chunk.offset
        end = offset + len(data)
        if offset > self._received_end:
            self._set_stop(
                ErrorCode.MALFORMED_FRAME,
                f"gap: chunk at {offset}, expected {self._received_end}",
            )
            return
        if end > self.frame.size:
            self._set_stop(ErrorCode.MALFORMED_FRAME, "chunk beyond the announced size")
            return
        if end <= self._received_end:
            return  # a duplicate of bytes already received
        data = data[self._received_end - offset :]
        if end - self._written > self.limits.window_bytes:
            self._set_stop(ErrorCode.RATE_LIMITED, "the sender exceeded window_bytes")
            return
        self._queue.append(data)
        self._received_end = end
        self._wake.set()

    async def run(self) -> None:
        """Write, acknowledge, verify, rename; exactly one ``file.done`` or ``file.failed``."""
        if not self._ready:
            raise RuntimeError("run() before a successful start()")
        try:
            while self._written < self.frame.size:
                if self._stop is None and not self._queue:
                    await self._wait_for_peer("file.chunk")
                if self._stop is not None:
                    code, message = self._stop
                    await self._keep_partial()
                    await self._fail(code, message, self._synced)
                    return
                batch = list(self._queue)
                self._queue.clear()
                await self._worker.call(self._write, batch)
                await self._emit(
                    FileAck(
                        session_id=self.session_id, channel_id=self.channel_id, offset=self._written
                    )
                )
            await self._complete()
        except FileTransferError as exc:
            await self._keep_partial()
            await self._fail(exc.code, exc.message, self._synced)
        finally:
            self._release()

    # -- worker-thread parts ------------------------------------------------------------

    def _prepare(self) -> None:
        frame = self.frame
        target = resolve_file_path(frame.path, self.allowlist, for_write=True)
        self._target = target
        self._dir_fd = _open_dir(target.parent)
        try:
            existing = os.stat(target.name, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        except OSError as exc:
            raise _io_error("cannot inspect the target", exc) from None
        if existing is not None:
            if not stat.S_ISREG(existing.st_mode):
                raise _refuse("the target is not a regular file")
            if not frame.overwrite:
                raise FileTransferError(ErrorCode.FILE_EXISTS, "the target exists")
        if len(self._part_name.encode()) > 255:
            raise _refuse("the file name is too long")
        self._fd = fd = _open_final(self._part_name, self._dir_fd, os.O_RDWR | os.O_CREAT)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _refuse("the partial file is not a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fchmod(fd, 0o600)
            kept = st.st_size
            if kept > frame.size:
                os.ftruncate(fd, 0)  # not a prefix of this content: start over
                kept = 0
            self._written = self._rehash_prefix(fd, kept)
            self._synced = self._written
        except BlockingIOError:
            raise FileTransferError(
                ErrorCode.FILE_EXISTS, "another upload of this content to this path is running"
            ) from None
        except OSError as exc:
            raise _io_error("cannot prepare the partial file", exc) from None

    def _rehash_prefix(self, fd: int, kept: int) -> int:
        at = 0
        while at < kept:
            if self._worker.abort.is_set():
                raise _Aborted
            data = _read_exactly(fd, min(_HASH_BLOCK_BYTES, kept - at), at)
            if not data:
                break
            self._hasher.update(data)
            at += len(data)
        if at < kept:
            os.ftruncate(fd, at)
        return at

    def _write(self, batch: list[bytes]) -> None:
        assert self._fd is not None
        try:
            for data in batch:
                view = memoryview(data)
                while view:
                    n = os.pwrite(self._fd, view, self._written)
                    view = view[n:]
                    self._written += n
                self._hasher.update(data)
            if self._written - self._synced >= self.limits.fsync_every_bytes:
                _fdatasync(self._fd)
                self._synced = self._written
        except OSError as exc:
            # pwrite may have gone through partly: the hash covers only complete batches,
            # so the partial file is cut back to what the hash and the acks cover
            with contextlib.suppress(OSError):
                self._written = self._synced
                os.ftruncate(self._fd, self._synced)
            raise _io_error("cannot write the partial file", exc) from None

    def _sync_partial(self) -> None:
        if self._fd is None:
            return
        try:
            _fdatasync(self._fd)
            self._synced = self._written
        except OSError as exc:
            log.warning("cannot fsync a partial file", extra={"error": exc.strerror})

    def _finalize(self) -> FileDone:
        assert self._fd is not None
        assert self._dir_fd is not None
        assert self._target is not None
        fd, dir_fd, name = self._fd, self._dir_fd, self._target.name
        digest = self._hasher.hexdigest()
        if digest != self.frame.sha256:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._part_name, dir_fd=dir_fd)
            self._written = self._synced = 0
            with contextlib.suppress(OSError):
                os.fsync(dir_fd)
            raise FileTransferError(
                ErrorCode.HASH_MISMATCH,
                f"the received bytes have SHA-256 {digest}, not the announced one",
            )
        try:
            os.fsync(fd)
            self._synced = self._written
            if self.frame.overwrite:
                try:
                    old = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    if stat.S_ISREG(old.st_mode):
                        os.fchmod(fd, stat.S_IMODE(old.st_mode) & 0o777)
                os.replace(self._part_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                # link() fails with EEXIST instead of replacing: a target that appeared while
                # the bytes arrived is never clobbered
                try:
                    os.link(
                        self._part_name,
                        name,
                        src_dir_fd=dir_fd,
                        dst_dir_fd=dir_fd,
                        follow_symlinks=False,
                    )
                except FileExistsError:
                    raise FileTransferError(
                        ErrorCode.FILE_EXISTS, "the target appeared during the upload"
                    ) from None
                os.unlink(self._part_name, dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError as exc:
            raise _io_error("cannot move the file into place", exc) from None
        return FileDone(
            session_id=self.session_id,
            channel_id=self.channel_id,
            path=str(self._target),
            size=self.frame.size,
            sha256=digest,
        )

    # -- event-loop parts -----------------------------------------------------------------

    async def _complete(self) -> None:
        try:
            done = await self._worker.call(self._finalize)
        except FileTransferError as exc:
            await self._fail(exc.code, exc.message, self._synced)
            return
        await self._finish(done)

    async def _keep_partial(self) -> None:
        with contextlib.suppress(_Aborted):
            await self._worker.call(self._sync_partial)


class DownloadChannel(_FileChannel):
    """Send ``file.download``'s file from its offset (see module docstring)."""

    frame: FileDownload

    def __init__(
        self,
        frame: FileDownload,
        send: Send,
        *,
        file_allowlist: Sequence[Path] | None = None,
        limits: FileLimits = FileLimits(),
        executor: Executor | None = None,
    ) -> None:
        super().__init__(
            frame, send, file_allowlist=file_allowlist, limits=limits, executor=executor
        )
        self.size = 0
        self.sha256 = ""
        self._hasher = hashlib.sha256()
        """State after the bytes before ``offset``, then after every byte sent."""
        self._stamp: tuple[int, int] = (0, 0)
        self._sent = frame.offset
        self._acked = frame.offset

    @property
    def acked(self) -> int:
        return self._acked

    def _kept_offset(self) -> int:
        return self._acked

    def ack(self, offset: int) -> None:
        """The receiver holds every byte before ``offset`` (``file.ack``)."""
        if offset > self._sent:
            self._set_stop(ErrorCode.MALFORMED_FRAME, "file.ack beyond the bytes sent")
        elif offset > self._acked:
            self._acked = offset
            self._wake.set()

    async def start(self) -> bool:
        """Hash the file, answer ``file.ready{size, sha256}`` or ``tunnel.error``."""
        if not FILES_SUPPORTED:
            return await self._refuse_request(
                ErrorCode.NOT_IMPLEMENTED, "file transfers are not supported on this platform"
            )
        try:
            await self._prepare_bounded(self._prepare)
        except FileTransferError as exc:
            return await self._refuse_request(exc.code, exc.message)
        except _Aborted:
            pass
        except BaseException:
            self._release()  # the task was cancelled outright: no answer, no descriptor left
            raise
        if self._stop is not None:
            return await self._refuse_request(ErrorCode.SESSION_CLOSED, self._stop[1])
        self._ready = True
        await self._emit(
            FileReady(
                req_id=self.frame.req_id,
                session_id=self.session_id,
                channel_id=self.channel_id,
                offset=self.frame.offset,
                size=self.size,
                sha256=self.sha256,
                window_bytes=self.limits.window_bytes,
                chunk_bytes=self.limits.chunk_bytes,
            )
        )
        return True

    async def run(self) -> None:
        """Send the chunks within the window; exactly one ``file.done`` or ``file.failed``."""
        if not self._ready:
            raise RuntimeError("run() before a successful start()")
        try:
            while self._sent < self.size:
                room = self.limits.window_bytes - (self._sent - self._acked)
                if self._stop is None and room <= 0:
                    await self._wait_for_peer("file.ack")
                    continue
                if self._stop is not None:
                    await self._fail(*self._stop, self._acked)
                    return
                n = min(self.limits.chunk_bytes, self.size - self._sent, room)
                data = await self._worker.call(self._read, n, self._sent)
                if len(data) < n:
                    raise FileTransferError(
                        ErrorCode.HASH_MISMATCH, "the file changed while it was read (shorter)"
                    )
                at = self._sent
                # counted before the send: a receiver may acknowledge from inside ``send``
                self._sent = at + n
                await self._emit(
                    FileChunk(
                        session_id=self.session_id, channel_id=self.channel_id, offset=at, data=data
                    )
                )
            if self._stop is not None:
                await self._fail(*self._stop, self._acked)
                return
            await self._worker.call(self._verify)
            assert self._target is not None
            await self._finish(
                FileDone(
                    session_id=self.session_id,
                    channel_id=self.channel_id,
                    path=str(self._target),
                    size=self.size,
                    sha256=self.sha256,
                )
            )
        except FileTransferError as exc:
            await self._fail(exc.code, exc.message, self._acked)
        finally:
            self._release()

    # -- worker-thread parts ------------------------------------------------------------

    def _prepare(self) -> None:
        target = resolve_file_path(self.frame.path, self.allowlist, for_write=False)
        self._target = target
        self._dir_fd = _open_dir(target.parent)
        self._fd = fd = _open_final(target.name, self._dir_fd, os.O_RDONLY)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise _io_error("cannot inspect the file", exc) from None
        if not stat.S_ISREG(st.st_mode):
            raise _refuse("the path is not a regular file")
        if st.st_size > self.limits.max_file_bytes:
            raise FileTransferError(
                ErrorCode.FILE_TOO_LARGE,
                f"the file is larger than the agent's limit of {self.limits.max_file_bytes} bytes",
            )
        if self.frame.offset > st.st_size:
            raise FileTransferError(
                ErrorCode.MALFORMED_FRAME, f"offset {self.frame.offset} is beyond the file's end"
            )
        self.size = st.st_size
        self._stamp = (st.st_size, st.st_mtime_ns)
        whole = hashlib.sha256()
        at = 0
        try:
            while at < self.size:
                if self._worker.abort.is_set():
                    raise _Aborted
                # stop exactly at offset once, to keep the hash state of the prefix
                limit = self.frame.offset if at < self.frame.offset else self.size
                data = _read_exactly(fd, min(_HASH_BLOCK_BYTES, limit - at), at)
                if not data:
                    raise FileTransferError(
                        ErrorCode.HASH_MISMATCH, "the file changed while it was hashed"
                    )
                whole.update(data)
                at += len(data)
                if at == self.frame.offset:
                    self._hasher = whole.copy()
        except OSError as exc:
            raise _io_error("cannot read the file", exc) from None
        if self.frame.offset == 0:
            self._hasher = hashlib.sha256()
        self.sha256 = whole.hexdigest()

    def _read(self, n: int, at: int) -> bytes:
        assert self._fd is not None
        try:
            data = _read_exactly(self._fd, n, at)
        except OSError as exc:
            raise _io_error("cannot read the file", exc) from None
        self._hasher.update(data)
        return data

    def _verify(self) -> None:
        assert self._fd is not None
        try:
            st = os.fstat(self._fd)
        except OSError as exc:
            raise _io_error("cannot inspect the file", exc) from None
        if (st.st_size, st.st_mtime_ns) != self._stamp or self._hasher.hexdigest() != self.sha256:
            raise FileTransferError(ErrorCode.HASH_MISMATCH, "the file changed while it was sent")


__all__ = [
    "FILES_SUPPORTED",
    "MAX_CHUNK_BYTES",
    "PARTIAL_MARKER",
    "DownloadChannel",
    "FileLimits",
    "FileTransferError",
    "Send",
    "UploadChannel",
    "default_file_allowlist",
    "partial_name",
    "resolve_file_path",
]
