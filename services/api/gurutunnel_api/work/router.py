"""``/api/v1/tunnel/{session_id}``: exec (full result or NDJSON), cancel, WebSocket ticket and
the live WebSocket. The contract is the README's "Inside a session" and its REST API table.

A client that goes away mid-command (the HTTP connection closes) cancels the command on the
agent: a watcher awaits the ASGI ``http.disconnect`` and cancels the request's work, whose
``CommandRun`` then publishes ``terminal.cancel``. The NDJSON body (:class:`_CommandStream`)
bounds each write by ``ws_send_timeout_s``: a client that stops reading is dropped (the body
ends unfinished) and its command abandoned the same way; so is a command whose stream is never
served (client gone right after the start, or the response never called within
``request_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Query, Request, WebSocket, status
from fastapi.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gurutunnel_protocol import ErrorCode, validate_id
from gurutunnel_protocol.messages import TerminalCancel, TerminalExit

from ..auth.models import Technician
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


async def get_work(request: Request) -> WorkContext:
    # async: a plain def dependency would cost a thread-pool hop per request (see deps.py)
    work: WorkContext = request.app.state.work
    return work


WorkDep = Annotated[WorkContext, Depends(get_work)]


class _ClientGone(Exception):
    """The HTTP client disconnected while its command ran."""


async def _until_disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it and raise ``_ClientGone``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request.receive))
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
    work: WorkContext, session_id: str, tech: Technician, body: ExecCreate
) -> tuple[CommandRun, StartedCommand]:
    try:
        return await service.authorize_and_start(work, session_id=session_id, tech=tech, spec=body)
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
    tech: CurrentUser,
    work: WorkDep,
    stream: bool = False,
    encoding: Encoding = "utf-8",
) -> ExecResult | Response:
    try:
        # authorization (403/404/409) and the audit row are one transaction
        run, started = await _unless_client_leaves(request, _start(work, session_id, tech, body))
    except _ClientGone:
        raise ApiError("client went away", code=ErrorCode.INTERNAL_ERROR) from None
    try:
        if await request.is_disconnected():
            raise _ClientGone
        if _wants_stream(request, stream):
            response = _CommandStream(run, started, send_timeout_s=work.settings.ws_send_timeout_s)
            work.background.spawn(
                _abandon_unless_served(response, bound_s=work.settings.request_timeout_s),
                name=f"ndjson-guard-{started.channel_id}",
            )
            return response
        return await _unless_client_leaves(request, service.collect(run, encoding=encoding))
    except BaseException as exc:
        run.abandon()  # a no-op once the run ended; otherwise cancel it on the agent
        if isinstance(exc, _ClientGone):
            # nobody reads the answer
            raise ApiError("client went away", code=ErrorCode.INTERNAL_ERROR) from None
        raise


class _SendTimeout(Exception):
    """The client did not take a part of the body within the send bound."""


class _CommandStream(Response):
    """The NDJSON body of one started command (see the module contract).

    Every ``send`` is bounded by ``send_timeout_s``; whatever ends the body (the exit line, a
    client that leaves, a client that stops reading, a cancellation, even before the first
    byte) the run is closed: its events generator and, if it has not ended, ``abandon()``."""

    media_type = NDJSON

    def __init__(self, run: CommandRun, started: StartedCommand, *, send_timeout_s: float) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-store"})
        self.run = run
        self.started = started
        self.send_timeout_s = send_timeout_s
        self.called = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.called.set()
        events: AsyncGenerator[service.Event, None] = self.run.events()
        body = asyncio.ensure_future(self._body(send, events))
        watcher = asyncio.ensure_future(_until_disconnected(receive))
        try:
            await asyncio.wait({body, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            body.cancel()
            watcher.cancel()
            try:
                await asyncio.gather(body, watcher, return_exceptions=True)
                await events.aclose()
            finally:
                self.run.abandon()  # a no-op once the run ended (also when never started)
        if not body.cancelled() and isinstance(body.exception(), _SendTimeout):
            log.info(
                "NDJSON client stopped reading; command abandoned",
                extra={"session_id": self.run.ref.session_id},
            )

    async def _send(self, send: Send, message: Message) -> None:
        try:
            await asyncio.wait_for(send(message), self.send_timeout_s)
        except TimeoutError:
            raise _SendTimeout from None

    async def _body(self, send: Send, events: AsyncGenerator[service.Event, None]) -> None:
        await self._send(
            send, {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        )
        first = ndjson_line(StreamStarted(channel_id=self.started.channel_id, pid=self.started.pid))
        await self._send(send, {"type": "http.response.body", "body": first, "more_body": True})
        async for event in events:
            line = _line(event, self.run)
            await self._send(send, {"type": "http.response.body", "body": line, "more_body": True})
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})


async def _abandon_unless_served(response: _CommandStream, *, bound_s: float) -> None:
    """A stream response that is never called (the request cancelled between the handler and
    the body) still ends its run."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(response.called.wait(), bound_s)
        return
    response.run.abandon()


def _line(event: service.Event, run: CommandRun) -> bytes:
    if isinstance(event, Chunk):
        return ndjson_line(StreamChunk(seq=event.seq, stream=event.stream, data=event.data))
    if isinstance(event, Gap):
        return ndjson_line(StreamGap(from_seq=event.from_seq, to_seq=event.to_seq))
    if isinstance(event, TerminalExit):
        return ndjson_line(
            StreamExit(
                seq=event.seq,
                reason=event.reason,
                exit_code=event.exit_code,
                truncated=event.truncated,
                duration_s=event.duration_s,
                stdout_bytes=event.stdout_bytes,
                stderr_bytes=event.stderr_bytes,
                error=event.error,
                session_close_reason=run.session_close_reason,
            )
        )
    assert isinstance(event, Lost)
    return ndjson_line(
        StreamError(
            code=event.code.value,
            message=event.message,
            session_close_reason=run.session_close_reason,
        )
    )


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
            tech_id, role = await service.redeem_ticket(db, ticket=ticket, session_id=session_id)
            ref = await service.authorize_ids(db, session_id=session_id, tech_id=tech_id, role=role)
    except ApiError as exc:
        code = CLOSE_SESSION_NOT_ACTIVE if exc.status == 409 else CLOSE_TICKET_REFUSED
        await websocket.close(code, exc.message[:120])
        return
    except Exception as exc:
        log.warning("websocket refused: database", extra={"error": type(exc).__name__})
        await websocket.close(1011, "database unavailable")
        return
    await TechSocket(websocket, work, ref).run()
