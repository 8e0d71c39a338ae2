"""``gurutunnel put`` and ``gurutunnel get``: resumable, SHA-256-verified file transfer.

Contract (the README's "Inside a session", "Files"):
- ``put``: hashes the local file first (streamed, ``CHUNK_BYTES`` reads), asks
  ``upload-offset``, then PUTs only the remainder from that offset with
  ``Content-Range: bytes <start>-<size-1>/<size>`` (the whole file, without Content-Range, when
  the offset is 0 or the agent already holds every byte). The body is read from disk as it is
  sent, never held whole. A 409 carrying ``X-Upload-Offset`` is retried once from that offset.
  The 201 answer must name the size and SHA-256 we computed.
- ``get``: downloads into ``<local>.gtpart``, resuming with ``Range: bytes=<part size>-`` when
  the part exists, hashes every byte (the resumed prefix included) and compares with
  ``X-Content-SHA256``. On a match the part is renamed into place atomically (an existing local
  file is refused unless ``overwrite``; the verified part is then kept); on a mismatch the part
  is deleted and ``hash_mismatch`` raised. A body short of ``Content-Length`` (the API aborted
  it, the link broke or stalled) keeps the part for a resume and raises
  ``incomplete_download``. A 416 with a part of the file's full size verifies the part and
  finishes; a part longer than the remote file is stale: deleted and downloaded again once.
- Progress bars go to the ``TransferProgress`` console (stderr in the CLI), never to stdout.
- Every failure is a ``CliError`` (exit 1); ``interrupted_message`` says what Ctrl-C left.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from gurutunnel_protocol import ErrorCode

from .client import ApiClient, JsonObject, RangeNotSatisfiable, UploadOffsetConflict
from .errors import ApiError, CliError

CHUNK_BYTES = 1024 * 1024
PART_SUFFIX = ".gtpart"
SHA256_HEADER = "X-Content-SHA256"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_UNSATISFIED_RANGE_RE = re.compile(r"bytes \*/(\d+)")


class LocalFileError(CliError):
    """The local side of a transfer failed (missing file, not a regular file, disk error)."""


# ---------------------------------------------------------------------------- progress
Advance = Callable[[int], None]


class TransferProgress:
    """Rich progress bars on one console (the CLI passes a stderr console)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def task(self, description: str, total: int, completed: int = 0) -> Iterator[Advance]:
        """A bar for the duration of the block; the yielded function adds transferred bytes."""
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        task_id = progress.add_task(description, total=total, completed=completed)
        with progress:
            yield lambda n: progress.advance(task_id, n)


# ---------------------------------------------------------------------------- local I/O
# Disk I/O stays in plain functions: a 1 MiB read or write is short, and the coroutines around
# them await between chunks so Ctrl-C (task cancellation) lands promptly.
def _read_chunks(path: Path, start: int, length: int) -> Iterator[bytes]:
    """Exactly ``length`` bytes of ``path`` from ``start``, in ``CHUNK_BYTES`` reads."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                chunk = f.read(min(CHUNK_BYTES, left))
                if not chunk:
                    raise LocalFileError(
                        "local_file_changed",
                        f"{path} shrank while it was read ({length - left} of {length} bytes)",
                    )
                left -= len(chunk)
                yield chunk
    except OSError as exc:
        raise LocalFileError("local_io_error", f"cannot read {path}: {exc.strerror}") from exc


async def hash_file(
    path: Path, size: int, progress: TransferProgress, description: str
) -> hashlib._Hash:
    """The SHA-256 of the first ``size`` bytes of ``path``, with a progress bar."""
    hasher = hashlib.sha256()
    with progress.task(description, total=size) as advance:
        for chunk in _read_chunks(path, 0, size):
            hasher.update(chunk)
            advance(len(chunk))
            await asyncio.sleep(0)
    return hasher


class _PartFile:
    """The ``.gtpart`` file a download is written to (appended to when resuming)."""

    def __init__(self, path: Path, append: bool) -> None:
        self.path = path
        try:
            self._f: IO[bytes] = path.open("ab" if append else "wb")
        except OSError as exc:
            raise LocalFileError("local_io_error", f"cannot write {path}: {exc.strerror}") from exc

    def write(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            raise LocalFileError("local_io_error", f"cannot write {self.path}: {exc}") from exc

    def close(self, *, sync: bool) -> None:
        try:
            if sync:
                # the rename that follows must not expose a file whose bytes are not on disk
                self._f.flush()
                os.fsync(self._f.fileno())
        except OSError as exc:
            raise LocalFileError("local_io_error", f"cannot write {self.path}: {exc}") from exc
        finally:
            self._f.close()


def part_path(local: Path) -> Path:
    """Where the download of ``local`` is kept until it is verified."""
    return local.with_name(local.name + PART_SUFFIX)


def _local_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalFileError("local_io_error", f"cannot stat {path}: {exc.strerror}") from exc


def _source_size(local: Path) -> int:
    """The size of the file to upload; it must be a regular file."""
    try:
        st = local.stat()
    except OSError as exc:
        raise LocalFileError("local_io_error", f"cannot read {local}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise LocalFileError("local_io_error", f"{local} is not a regular file")
    return st.st_size


def _check_target(local: Path, *, overwrite: bool) -> None:
    """Refuse a download target that is a directory, or exists without ``overwrite``."""
    if local.is_dir():
        raise LocalFileError("local_io_error", f"{local} is a directory")
    if not overwrite and local.exists():
        raise LocalFileError(
            ErrorCode.FILE_EXISTS.value, f"{local} exists (pass --overwrite to replace it)"
        )


def _bad_response(status: int, message: str) -> ApiError:
    return ApiError(status, "bad_response", message)


def _expected_sha256(status: int, headers: httpx.Headers) -> str:
    value = str(headers.get(SHA256_HEADER, "")).strip().lower()
    if not _SHA256_RE.fullmatch(value):
        raise _bad_response(status, f"the API sent no valid {SHA256_HEADER} header")
    return value


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TransferResult:
    path: str
    size: int
    sha256: str
    resumed_from: int

    def line(self) -> str:
        """What the CLI prints on stdout: ``<path> <size> <sha256>``."""
        return f"{self.path} {self.size} {self.sha256}"


class FileTransfer:
    """One ``put`` or ``get`` in one session; see the module docstring."""

    def __init__(
        self,
        session_id: str,
        progress: TransferProgress,
        notice: Callable[[str], None],
    ) -> None:
        self.session_id = session_id
        self.progress = progress
        self.notice = notice
        self._interrupt_hint = "nothing was transferred"

    def interrupted_message(self) -> str:
        """The line Ctrl-C prints: what was left behind and how to go on."""
        return f"interrupted; {self._interrupt_hint}"

    # ------------------------------------------------------------------ upload
    async def put(
        self, client: ApiClient, local: Path, remote: str, *, overwrite: bool
    ) -> TransferResult:
        """Upload ``local`` to ``remote``, sending only what the agent does not hold yet."""
        size = _source_size(local)
        sha256 = (await hash_file(local, size, self.progress, f"sha256 {local.name}")).hexdigest()
        offset = await client.upload_offset(self.session_id, remote, size, sha256)
        for attempt in range(2):
            # an agent holding every byte still needs a body to finish: send the whole file
            start = offset if offset < size else 0
            self._interrupt_hint = (
                "the agent keeps the partial upload: resume with the same command"
            )
            try:
                with self.progress.task(
                    f"upload {local.name}", total=size, completed=start
                ) as advance:
                    body = await client.put_file(
                        self.session_id,
                        remote,
                        _upload_body(local, start, size - start, advance),
                        length=size - start,
                        sha256=sha256,
                        content_range=f"bytes {start}-{size - 1}/{size}" if start else None,
                        overwrite=overwrite,
                    )
            except UploadOffsetConflict as exc:
                if attempt or not 0 <= exc.offset <= size:
                    raise
                self.notice(f"the agent holds {exc.offset} bytes; resuming from there")
                offset = exc.offset
                continue
            return self._upload_result(body, remote, size, sha256, start)
        raise AssertionError("unreachable: the second attempt returns or raises")

    @staticmethod
    def _upload_result(
        body: JsonObject, remote: str, size: int, sha256: str, start: int
    ) -> TransferResult:
        if body.get("size") != size or str(body.get("sha256", "")).lower() != sha256:
            raise _bad_response(
                201,
                f"the API stored size={body.get('size')} sha256={body.get('sha256')}, "
                f"we sent size={size} sha256={sha256}",
            )
        return TransferResult(str(body.get("path") or remote), size, sha256, start)

    # ------------------------------------------------------------------ download
    async def get(
        self, client: ApiClient, remote: str, local: Path, *, overwrite: bool
    ) -> TransferResult:
        """Download ``remote`` to ``local`` through ``<local>.gtpart``, verified."""
        part = part_path(local)
        _check_target(local, overwrite=overwrite)
        for attempt in range(2):
            start = _local_size(part) or 0
            hasher = (
                await hash_file(part, start, self.progress, f"verify {part.name}")
                if start
                else hashlib.sha256()
            )
            self._interrupt_hint = (
                f"the partial download is kept in {part}: resume with the same command"
            )
            try:
                size, sha256, start, hasher = await self._receive(
                    client, remote, part, start, hasher
                )
            except RangeNotSatisfiable as exc:
                if not start:
                    raise
                size, sha256 = await self._remote_size_and_hash(client, remote, start, exc)
                if size < start and not attempt:
                    part.unlink(missing_ok=True)
                    self.notice(
                        f"{part} is longer than the remote file ({size} bytes): deleted it, "
                        "downloading again"
                    )
                    continue
                if size != start:
                    raise
            self._verify(part, hasher.hexdigest(), sha256)
            _place(part, local, overwrite=overwrite)
            return TransferResult(str(local), size, sha256, start)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _receive(
        self, client: ApiClient, remote: str, part: Path, start: int, hasher: hashlib._Hash
    ) -> tuple[int, str, int, hashlib._Hash]:
        """Stream the file from ``start`` into ``part``, continuing ``hasher``.

        Returns (size, expected sha256, the offset the body really started at, the hasher of
        the whole part): a 200 answer to a Range request restarts the part and its hash at 0.
        """
        async with client.download(self.session_id, remote, start) as response:
            status = response.status_code
            sha256 = _expected_sha256(status, response.headers)
            length_header = response.headers.get("Content-Length", "")
            if not length_header.isdigit():
                raise _bad_response(status, "the API sent no Content-Length")
            length = int(length_header)
            if status == 206:
                match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", ""))
                if match is None or int(match.group(1)) != start:
                    raise _bad_response(
                        status,
                        f"Content-Range {response.headers.get('Content-Range')!r} does not "
                        f"start at {start}",
                    )
                size = int(match.group(3))
            else:
                if start:
                    self.notice("the API sent the whole file; the partial download is replaced")
                    start = 0
                    hasher = hashlib.sha256()
                size = length
            if start + length != size:
                raise _bad_response(status, f"Content-Length {length} from {start} is not {size}")
            received = await self._stream_to_part(response, part, start, length, size, hasher)
        if received < length:
            raise self._incomplete(part, start + received, size, "the body ended early")
        return size, sha256, start, hasher

    async def _stream_to_part(
        self,
        response: httpx.Response,
        part: Path,
        start: int,
        length: int,
        size: int,
        hasher: hashlib._Hash,
    ) -> int:
        received = 0
        out = _PartFile(part, append=start > 0)
        complete = False
        try:
            with self.progress.task(
                f"download {part.name.removesuffix(PART_SUFFIX)}", total=size, completed=start
            ) as adv:
                try:
                    async for chunk in response.aiter_bytes():
                        if received + len(chunk) > length:
                            raise _bad_response(
                                response.status_code, "the body is longer than its Content-Length"
                            )
                        out.write(chunk)
                        hasher.update(chunk)
                        received += len(chunk)
                        adv(len(chunk))
                except httpx.TimeoutException as exc:
                    raise self._incomplete(
                        part, start + received, size, "the transfer stalled"
                    ) from exc
                except httpx.TransportError as exc:
                    raise self._incomplete(
                        part, start + received, size, f"the transfer broke ({exc})"
                    ) from exc
            complete = received == length
        finally:
            out.close(sync=complete)
        return received

    @staticmethod
    def _incomplete(part: Path, have: int, size: int, why: str) -> CliError:
        return CliError(
            "incomplete_download",
            f"{why}: {have} of {size} bytes received; the partial download is kept in {part}: "
            "resume with the same command",
        )

    async def _remote_size_and_hash(
        self, client: ApiClient, remote: str, start: int, exc: RangeNotSatisfiable
    ) -> tuple[int, str]:
        """After a 416 for ``start``: the remote file's size and SHA-256.

        Taken from the 416 itself when it carries ``Content-Range: bytes */<size>`` and the
        hash; otherwise from the headers of a one-byte ``Range: bytes=<start-1>-`` request.
        """
        match = _UNSATISFIED_RANGE_RE.fullmatch(exc.headers.get("Content-Range", ""))
        if match is not None and SHA256_HEADER in exc.headers:
            return int(match.group(1)), _expected_sha256(416, exc.headers)
        async with client.download(self.session_id, remote, start - 1) as response:
            sha256 = _expected_sha256(response.status_code, response.headers)
            if response.status_code == 206:
                found = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", ""))
                if found is not None:
                    return int(found.group(3)), sha256
            length = response.headers.get("Content-Length", "")
            if response.status_code == 200 and length.isdigit():
                return int(length), sha256
            raise _bad_response(response.status_code, "cannot learn the remote file's size")

    @staticmethod
    def _verify(part: Path, got: str, expected: str) -> None:
        if got != expected:
            part.unlink(missing_ok=True)
            raise CliError(
                ErrorCode.HASH_MISMATCH.value,
                f"the downloaded bytes hash to {got}, the API announced {expected}; deleted "
                f"{part}, run the command again to download from the start",
            )


async def _upload_body(
    path: Path, start: int, length: int, advance: Advance
) -> AsyncIterator[bytes]:
    """The PUT body: ``length`` bytes of ``path`` from ``start``, read as they are sent."""
    for chunk in _read_chunks(path, start, length):
        advance(len(chunk))
        yield chunk


def _place(part: Path, local: Path, *, overwrite: bool) -> None:
    """Move the verified part to ``local`` atomically; without ``overwrite`` never replace."""
    try:
        if overwrite:
            os.replace(part, local)
            return
        try:
            # link() creates the name atomically and fails if it exists: no check-then-rename race
            os.link(part, local)
        except FileExistsError:
            raise LocalFileError(
                ErrorCode.FILE_EXISTS.value,
                f"{local} exists (pass --overwrite to replace it); the verified download is "
                f"kept in {part}",
            ) from None
        except OSError:
            # a file system without hard links: check, then rename
            if local.exists():
                raise LocalFileError(
                    ErrorCode.FILE_EXISTS.value,
                    f"{local} exists (pass --overwrite to replace it); the verified download "
                    f"is kept in {part}",
                ) from None
            os.replace(part, local)
            return
        part.unlink()
    except OSError as exc:
        raise LocalFileError(
            "local_io_error", f"cannot move {part} to {local}: {exc.strerror}"
        ) from exc
