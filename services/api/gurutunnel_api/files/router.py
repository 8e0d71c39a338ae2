"""``/api/v1/tunnel/{session_id}/files``: upload (resume probe, PUT) and download (GET, Range).

The contract is the README's "Inside a session" and its REST API table. Checks run in this
order, before anything reaches the agent: the technician's permission (403 ``forbidden``
without ``can_upload`` / ``can_download``), the path (422 ``path_not_allowed``), the upload's
headers (411 / 422 ``validation_error``), the session (404, 403, 409 as for commands).

A download's response is a :class:`DownloadResponse`: whatever ends it (complete, aborted, the
client gone before or during the body), its ``close`` runs, so the agent's transfer is
cancelled and the audit row completed even when the body was never iterated. A
``TransferAborted`` from the body ends the ASGI call without the final body message: uvicorn
then closes the connection ("ASGI callable returned without completing response"), so the
client sees a body short of ``Content-Length`` (checked by the integration and e2e tests).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages.files import MAX_FILE_PATH_CHARS

from ..auth.models import Technician, may_download, may_upload
from ..deps import CurrentUser, IdPath, SessionDep
from ..errors import FileRefused, Forbidden
from ..schemas import error_responses
from ..work import service as work_service
from ..work.router import WorkDep
from ..work.service import WorkContext
from . import service
from .schemas import FileStored, UploadOffsetCreate, UploadOffsetPublic
from .service import SHA256_HEADER, ClientGone, Download, TransferAborted

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/tunnel", tags=["files"])

PathQuery = Annotated[
    str, Query(max_length=MAX_FILE_PATH_CHARS, description="absolute path on the agent")
]
_UNSAFE_FILENAME_RE = re.compile(r'[^\x20-\x7e]|["\\]')

_FILE_ERRORS = {
    403: "`forbidden`: no `can_upload`/`can_download`, or not the session's owner; "
    "`path_not_allowed`: refused by the agent's allowlist",
    404: "`not_found`: no such session; `file_not_found`: no such file (or directory)",
    409: "`conflict` (session not active; upload: Content-Range start is not the agent's "
    "offset, header `X-Upload-Offset`), `file_exists`, `agent_offline`",
    411: "`validation_error`: Content-Length is required",
    413: "`file_too_large`: above the agent's limit",
    416: "`range_not_satisfiable`: the Range starts at or beyond the size "
    "(`Content-Range: bytes */<size>`)",
    422: "`validation_error`: bad query, body or header; `path_not_allowed`: not absolute, NUL, "
    "`.` or `..` component; `hash_mismatch`: the bytes do not have the announced SHA-256",
    502: "`io_error`: the agent could not read or write the file; `agent_error`",
    504: "`agent_timeout`: the agent did not answer or stopped making progress",
}


def _responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    documented = error_responses(401, 503)
    for code in statuses:
        documented[code] = {**documented[401], "description": _FILE_ERRORS[code]}
    return documented


def _require_upload(tech: Technician) -> None:
    if not may_upload(tech):
        raise Forbidden("you may not upload files (can_upload)")


def _require_download(tech: Technician) -> None:
    if not may_download(tech):
        raise Forbidden("you may not download files (can_download)")


@router.post(
    "/{session_id}/files/upload-offset",
    response_model=UploadOffsetPublic,
    responses=_responses(403, 404, 409, 413, 422, 502, 504),
)
async def upload_offset(
    session_id: IdPath, body: UploadOffsetCreate, db: SessionDep, tech: CurrentUser, work: WorkDep
) -> UploadOffsetPublic:
    """How many bytes of this exact content the agent holds from an interrupted upload."""
    _require_upload(tech)
    path = service.check_path(body.path)
    ref = await work_service.authorize(db, session_id=session_id, tech=tech)
    offset = await service.probe_upload_offset(
        work, ref=ref, path=path, size=body.size, sha256=body.sha256
    )
    return UploadOffsetPublic(offset=offset)


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for piece in request.stream():
            yield piece
    except ClientDisconnect:
        raise ClientGone from None


@router.put(
    "/{session_id}/files",
    response_model=FileStored,
    status_code=status.HTTP_201_CREATED,
    responses=_responses(403, 404, 409, 411, 413, 422, 502, 504),
)
async def upload_file(
    session_id: IdPath,
    path: PathQuery,
    request: Request,
    db: SessionDep,
    tech: CurrentUser,
    work: WorkDep,
    overwrite: bool = False,
) -> FileStored:
    """Stream the body to the agent; 201 once it verified the SHA-256 and renamed the file."""
    _require_upload(tech)
    spec = service.upload_spec(
        path=service.check_path(path),
        overwrite=overwrite,
        content_length=request.headers.get("content-length"),
        sha256=request.headers.get(SHA256_HEADER),
        content_range=request.headers.get("content-range"),
    )
    ref = await work_service.authorize(db, session_id=session_id, tech=tech)
    try:
        done = await service.upload(work, ref=ref, spec=spec, body=_body(request))
    except ClientGone:
        # nobody reads this answer; the agent keeps the partial file for a resume
        raise FileRefused(
            400, ErrorCode.VALIDATION_ERROR, "the client went away mid-upload"
        ) from None
    return FileStored(path=done.path, size=done.size, sha256=done.sha256)


class DownloadResponse(StreamingResponse):
    """The streamed body of a :class:`Download`, closed whatever ends the response."""

    def __init__(self, run: Download, work: WorkContext, **kwargs: object) -> None:
        super().__init__(run.body(), **kwargs)  # type: ignore[arg-type]
        self._run = run
        self._work = work

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except TransferAborted:
            # already logged by the service; returning without the final body message makes
            # the server close the connection, so the body stays short of Content-Length
            pass
        finally:
            # in a task of its own: a cancelled response must still cancel the agent's side
            closing = self._work.background.spawn(self._run.close(), name="download-close")
            await asyncio.shield(closing)


def _disposition(path: str) -> str:
    name = re.split(r"[\\/]", path)[-1] or "download"
    safe = _UNSAFE_FILENAME_RE.sub("_", name)
    if safe == name:
        return f'attachment; filename="{name}"'
    return f"attachment; filename=\"{safe}\"; filename*=UTF-8''{quote(name, safe='')}"


@router.get(
    "/{session_id}/files",
    response_class=StreamingResponse,
    responses={
        **_responses(403, 404, 413, 416, 422, 502, 504),
        200: {"description": "the whole file", "content": {"application/octet-stream": {}}},
        206: {"description": "from the Range start", "content": {"application/octet-stream": {}}},
    },
)
async def download_file(
    session_id: IdPath,
    path: PathQuery,
    request: Request,
    db: SessionDep,
    tech: CurrentUser,
    work: WorkDep,
) -> StreamingResponse:
    """Stream the file (from ``Range: bytes=<start>-``) with its SHA-256 in a header."""
    _require_download(tech)
    path = service.check_path(path)
    ref = await work_service.authorize(db, session_id=session_id, tech=tech)
    start = service.range_start(request.headers.get("range"))
    run = Download(work, ref=ref, path=path, start=start)
    ready = await run.open()
    # an empty file has no byte to start a range at: it is sent whole
    partial = start is not None and ready.size > 0
    first = start or 0
    headers = {
        "Content-Length": str(ready.size - first),
        SHA256_HEADER: ready.sha256 or "",
        "Content-Disposition": _disposition(path),
        "Accept-Ranges": "bytes",
        "Cache-Control": "no-store",
    }
    if partial:
        headers["Content-Range"] = f"bytes {first}-{ready.size - 1}/{ready.size}"
    return DownloadResponse(
        run,
        work,
        status_code=206 if partial else 200,
        headers=headers,
        media_type="application/octet-stream",
    )
