"""File channel: upload to and download from the agent, in acknowledged chunks.

Contract:
- A transfer runs on its own channel ``channel_id``. Paths are absolute; the agent resolves them
  (symlinks included) and refuses anything outside its allowlist (``path_not_allowed``), a final
  component that is a symlink, and sizes above its limit (``file_too_large``).
- **Upload** (server -> agent): request ``file.upload{path, size, sha256, overwrite}``; the agent
  answers ``file.ready{offset}``: the bytes of an earlier interrupted upload of the same content
  (same ``sha256``) to the same path that it already holds, so the sender resumes there. The
  sender then sends ``file.chunk{offset, data}`` frames in order, never more than
  ``window_bytes`` (from ``file.ready``) beyond the last ``file.ack{offset}`` the agent sent.
  Bytes go to a partial file next to the target; when ``size`` bytes are in and their SHA-256
  equals ``sha256``, the agent renames the partial file into place atomically and answers
  ``file.done``; otherwise ``file.failed{hash_mismatch}`` and the partial file is removed. No
  partial file is ever under the final name.
- **Download** (agent -> server): request ``file.download{path, offset}``; the agent answers
  ``file.ready{size, sha256, offset}`` (``sha256`` of the whole file), then sends ``file.chunk``
  frames from ``offset``, never more than ``window_bytes`` beyond the last ``file.ack`` from the
  server, and ends with ``file.done{size, sha256}`` — or ``file.failed`` (for example
  ``hash_mismatch`` when the file changed while it was read).
- ``file.cancel`` (server -> agent) abandons a transfer; an upload's partial file is kept for a
  later resume. Closing the session cancels every transfer.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from ..errors import ErrorCode
from ..ids import Id
from .base import Frame, WireBytes

MAX_FILE_PATH_CHARS = 4096

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
"""A SHA-256 digest as 64 lowercase hex characters."""

FilePath = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_FILE_PATH_CHARS, pattern=r"^[^\x00]+$"),
]
"""An absolute path on the agent (no NUL; the agent checks the rest)."""


class FileUpload(Frame):
    """server -> agent: receive ``size`` bytes into ``path``; answered by ``file.ready``."""

    type: Literal["file.upload"] = "file.upload"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    path: FilePath
    size: int = Field(ge=0)
    sha256: Sha256Hex
    overwrite: bool = False


class FileDownload(Frame):
    """server -> agent: send ``path`` from ``offset``; answered by ``file.ready``."""

    type: Literal["file.download"] = "file.download"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    path: FilePath
    offset: int = Field(default=0, ge=0)


class FileReady(Frame):
    """agent -> server: start at ``offset``; at most ``window_bytes`` may be unacknowledged."""

    type: Literal["file.ready"] = "file.ready"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    offset: int = Field(ge=0)
    size: int = Field(ge=0)
    sha256: Sha256Hex | None = None
    """Download: the whole file's digest; upload: absent."""
    window_bytes: int = Field(gt=0)
    chunk_bytes: int = Field(gt=0)


class FileChunk(Frame):
    """Both directions: ``data`` belongs at byte ``offset`` of the file."""

    type: Literal["file.chunk"] = "file.chunk"
    session_id: Id
    channel_id: Id
    offset: int = Field(ge=0)
    data: WireBytes


class FileAck(Frame):
    """Both directions: every byte before ``offset`` was received (upload: written to disk)."""

    type: Literal["file.ack"] = "file.ack"
    session_id: Id
    channel_id: Id
    offset: int = Field(ge=0)


class FileDone(Frame):
    """agent -> server: the transfer is complete and verified."""

    type: Literal["file.done"] = "file.done"
    session_id: Id
    channel_id: Id
    path: FilePath
    size: int = Field(ge=0)
    sha256: Sha256Hex


class FileFailed(Frame):
    """agent -> server: the transfer ended without a complete, verified file."""

    type: Literal["file.failed"] = "file.failed"
    session_id: Id
    channel_id: Id
    code: ErrorCode
    error: str = Field(max_length=1024)
    offset: int = Field(default=0, ge=0)
    """Upload: bytes kept in the partial file for a resume."""


class FileCancel(Frame):
    """server -> agent: abandon the transfer on ``channel_id`` (no answer)."""

    type: Literal["file.cancel"] = "file.cancel"
    session_id: Id
    channel_id: Id
