"""``/api/v1/tunnel/{session_id}``: exec (full result or NDJSON), cancel, WebSocket ticket and
the live WebSocket. The contract is the README's "Inside a session" and /tmp/exec_api.md.

A client that goes away mid-command (the HTTP connection closes) cancels the command on the
agent: a watcher awaits the ASGI ``http.disconnect`` and cancels the request's work, whose
``CommandRun`` then publishes ``terminal.cancel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Query, Request, WebSocket, status
from fastapi.responses import StreamingResponse

from gurutunnel_protocol import ErrorCode, validate_id
from gurutunnel_protocol.messages import TerminalCancel, TerminalExit

from ..bus import BusError
from ..deps import BusDep, CurrentUser, IdPath, SessionDep, SettingsDep
from ..errors import ApiError, NotFound, bus_error_to_api
from ..schemas import error_responses
from . import service
from .schemas import (
    Encoding,
    ExecCancelled,
    ExecCreate,
    ExecResult,
    StreamChunk,
    StreamError,
    StreamExit,
    StreamGap,
    StreamStarted,
    WsTicketPublic,
    ndjson_line,
)
from .service import Chunk, CommandRun, Gap, Lost, StartedCommand, WorkContext
from .ws import CLOSE_SESSION_NOT_ACTIVE, CLOSE_TICKET_REFUSED, TechSocket

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/tunnel", tags=["work"])

NDJSON = "application/x-ndjson"
T = TypeVar("T")


def get_work(request: Request) -> WorkContext:
    work: WorkContext = request.app.state.work
    return work


WorkDep = Annotated[WorkContext, Depends(get_work)]


class _ClientGone(Exception):
    """The HTTP client disconnected while its command ran."""


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it and raise ``_ClientGone``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
    if task.cancelled():
        raise _ClientGone
    return task.result()


def _wants_stream(request: Request, stream: bool) -> bool:
    return stream or NDJSON in request.headers.get("accept", "")


async def _start(
    work: WorkContext, ref: service.SessionRef, body: ExecCreate
) -> tuple[CommandRun, StartedCommand]:
    try:
        return await service.start_command(work, ref=ref, spec=body)
    except BusError as exc:
        raise bus_error_to_api(exc) from None


@router.post(
    "/{session_id}/exec",
    response_model=ExecResult,
    responses={
        **error_responses(401, 403, 404, 409, 422, 429, 502, 504),
        200: {
            "description": "the full result, or with `?stream=true` (or `Accept: "
            "application/x-ndjson`) an NDJSON stream of started/chunk/gap/exit|error events",
            "content": {NDJSON: {}},
        },
    },
)
async def exec_command(
    session_id: IdPath,
    body: ExecCreate,
    request: Request,
    db: SessionDep,
    tech: CurrentUser,
    work: WorkDep,
    stream: bool = False,
    encoding: Encoding = "utf-8",
) -> ExecResult | StreamingResponse:
    ref = await service.authorize(db, session_id=session_id, tech=tech)
    try:
        run, started = await _unless_client_leaves(request, _start(work, ref, body))
    except _ClientGone:
        raise ApiError("client went away", code=ErrorCode.INTERNAL_ERROR) from None
    if _wants_stream(request, stream):
        return StreamingResponse(
            _ndjson(request, run, started), media_type=NDJSON, headers={"Cache-Control": "no-store"}
        )
    try:
        return await _unless_client_leaves(request, service.collect(run, encoding=encoding))
    except _ClientGone:
        # nobody reads the answer; the command was cancelled on the agent by CommandRun
        raise ApiError("client went away", code=ErrorCode.INTERNAL_ERROR) from None


async def _ndjson(
    request: Request, run: CommandRun, started: StartedCommand
) -> AsyncIterator[bytes]:
    """The NDJSON lines of one command; a client that leaves cancels it (see the module doc)."""
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _until_disconnected(request)
        gone = True
        current.cancel()

    watcher = asyncio.ensure_future(watch())
    events: AsyncGenerator[service.Event, None] = run.events()
    try:
        yield ndjson_line(StreamStarted(channel_id=started.channel_id, pid=started.pid))
        async for event in events:
            if isinstance(event, Chunk):
                line = ndjson_line(StreamChunk(seq=event.seq, stream=event.stream, data=event.data))
            elif isinstance(event, Gap):
                line = ndjson_line(StreamGap(from_seq=event.from_seq, to_seq=event.to_seq))
            elif isinstance(event, TerminalExit):
                line = ndjson_line(
                    StreamExit(
                        seq=event.seq,
                        reason=event.reason,
                        exit_code=event.exit_code,
                        truncated=event.truncated,
                        duration_s=event.duration_s,
                        stdout_bytes=event.stdout_bytes,
                        stderr_bytes=event.stderr_bytes,
                        error=event.error,
                    )
                )
            else:
                assert isinstance(event, Lost)
                line = ndjson_line(StreamError(code=event.code.value, message=event.message))
            yield line
    except asyncio.CancelledError:
        if not gone:
            raise
        # the client left: end quietly; closing ``events`` below cancels the command
        current.uncancel()
    finally:
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
        await events.aclose()


@router.post(
    "/{session_id}/exec/{channel_id}/cancel",
    response_model=ExecCancelled,
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(401, 403, 404, 409),
)
async def cancel_command(
    session_id: IdPath,
    channel_id: IdPath,
    db: SessionDep,
    bus: BusDep,
    tech: CurrentUser,
    work: WorkDep,
) -> ExecCancelled:
    ref = await service.authorize(db, session_id=session_id, tech=tech)
    if not await service.running_command_exists(db, session_id=session_id, channel_id=channel_id):
        raise NotFound("no such running command in this session")
    await service.record_activity(work.sessionmaker, session_id)
    await bus.publish_session_down(
        ref.session_id, TerminalCancel(session_id=ref.session_id, channel_id=channel_id)
    )
    return ExecCancelled(channel_id=channel_id)


@router.post(
    "/{session_id}/ws-ticket",
    response_model=WsTicketPublic,
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(401, 403, 404, 409),
)
async def ws_ticket(
    session_id: IdPath, db: SessionDep, tech: CurrentUser, settings: SettingsDep
) -> WsTicketPublic:
    ref = await service.authorize(db, session_id=session_id, tech=tech)
    ticket = await service.issue_ticket(db, ref=ref, ttl_s=settings.ws_ticket_ttl_s)
    return WsTicketPublic(ticket=ticket, expires_in=round(settings.ws_ticket_ttl_s))


@router.websocket("/{session_id}/ws")
async def session_socket(
    websocket: WebSocket, session_id: str, ticket: Annotated[str | None, Query()] = None
) -> None:
    """Accept, then redeem the ticket (4401 when refused) and check the session (4409)."""
    work: WorkContext = websocket.app.state.work
    await websocket.accept()
    try:
        validate_id(session_id, what="session_id")
    except ValueError:
        await websocket.close(CLOSE_TICKET_REFUSED, "invalid session id")
        return
    if not ticket or len(ticket) > 256:
        await websocket.close(CLOSE_TICKET_REFUSED, "missing ticket")
        return
    try:
        async with work.sessionmaker() as db:
            tech_id, is_admin = await service.redeem_ticket(
                db, ticket=ticket, session_id=session_id
            )
            ref = await service.authorize_ids(
                db, session_id=session_id, tech_id=tech_id, is_admin=is_admin
            )
    except ApiError as exc:
        code = CLOSE_SESSION_NOT_ACTIVE if exc.status == 409 else CLOSE_TICKET_REFUSED
        await websocket.close(code, exc.message[:120])
        return
    except Exception as exc:
        log.warning("websocket refused: database", extra={"error": type(exc).__name__})
        await websocket.close(1011, "database unavailable")
        return
    await TechSocket(websocket, work, ref).run()
