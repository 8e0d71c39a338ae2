"""HTTP schemas of file transfer inside a session (contract: the README's
"Inside a session")."""

from __future__ import annotations

from pydantic import BaseModel, Field

from gurutunnel_protocol.messages.files import MAX_FILE_PATH_CHARS, Sha256Hex

from ..schemas import RequestModel


class UploadOffsetCreate(RequestModel):
    """``POST /tunnel/{session_id}/files/upload-offset``: the upload about to be made."""

    # checked by the files service (422 ``path_not_allowed``), not by the model
    path: str = Field(max_length=MAX_FILE_PATH_CHARS)
    size: int = Field(ge=0)
    sha256: Sha256Hex


class UploadOffsetPublic(BaseModel):
    offset: int
    """Bytes of this exact content (same path, same SHA-256) the agent already holds."""


class FileStored(BaseModel):
    """The 201 of an upload: the file as the agent placed it (its resolved path)."""

    path: str
    size: int
    sha256: str
