"""The one place that turns failures into HTTP answers.

Every error response is ``{"error": {"code": ErrorCode, "message": str}}``; no response ever
carries a stack trace. Domain errors of the services (:class:`ApiError` subclasses) and of the bus
(:mod:`.bus`) map to fixed statuses; request validation is 422 ``validation_error``; unknown
routes 404 ``not_found``; wrong methods 405 ``method_not_allowed``; a database that does not
answer 503 ``database_unavailable``; anything unexpected is logged with its trace and answered
500 ``internal_error``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from gurutunnel_protocol import ErrorCode

from .bus import BusError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A failure with a documented HTTP answer."""

    status: int = 500
    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers
        if code is not None:
            self.code = code


class Unauthorized(ApiError):
    status, code = 401, ErrorCode.UNAUTHORIZED


class Forbidden(ApiError):
    status, code = 403, ErrorCode.FORBIDDEN


class NotFound(ApiError):
    status, code = 404, ErrorCode.NOT_FOUND


class Conflict(ApiError):
    """409; ``code`` says which conflict (session_exists, agent_offline, agent_busy, ...)."""

    status, code = 409, ErrorCode.CONFLICT


class AgentFailed(ApiError):
    """The agent answered something that is not what the request needed."""

    status, code = 502, ErrorCode.AGENT_ERROR


class GatewayTimeout(ApiError):
    status, code = 504, ErrorCode.AGENT_TIMEOUT


class ServiceUnavailable(ApiError):
    status, code = 503, ErrorCode.SERVICE_UNAVAILABLE


class Unprocessable(ApiError):
    """422 with the agent's own refusal code (``cwd_not_allowed``, ``invalid_command``)."""

    status, code = 422, ErrorCode.VALIDATION_ERROR


class TooManyRequests(ApiError):
    status, code = 429, ErrorCode.TOO_MANY_CHANNELS


class FileRefused(ApiError):
    """A file transfer refused or failed; the status comes from :data:`FILE_STATUSES`."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, headers=headers)
        self.status = status


class DatabaseUnavailable(ApiError):
    """The database could not record what must be recorded first (e.g. a command's audit)."""

    status, code = 503, ErrorCode.DATABASE_UNAVAILABLE


_STATUS_CODES = {
    400: ErrorCode.VALIDATION_ERROR,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.CONFLICT,
    422: ErrorCode.VALIDATION_ERROR,
    503: ErrorCode.SERVICE_UNAVAILABLE,
}


def error_body(code: ErrorCode, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code.value, "message": message}}


def error_response(
    status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


@dataclass(frozen=True, slots=True)
class Failure:
    """What one agent/bus error code means: the session close reason and the HTTP answer."""

    reason: str
    status: int
    code: ErrorCode
    message: str

    def error(self) -> ApiError:
        return _BY_STATUS[self.status](self.message, code=self.code)


_BY_STATUS: dict[int, type[ApiError]] = {
    409: Conflict,
    502: AgentFailed,
    503: ServiceUnavailable,
    504: GatewayTimeout,
}
_AGENT_ERROR = Failure("agent_error", 502, ErrorCode.AGENT_ERROR, "agent refused the command")

# the one table from an agent/bus error code to (session close reason, API error)
FAILURES: dict[ErrorCode, Failure] = {
    ErrorCode.AGENT_OFFLINE: Failure(
        "agent_offline", 409, ErrorCode.AGENT_OFFLINE, "agent is offline"
    ),
    ErrorCode.AGENT_TIMEOUT: Failure(
        "open_timeout", 504, ErrorCode.AGENT_TIMEOUT, "agent did not answer in time"
    ),
    ErrorCode.BUS_UNAVAILABLE: Failure(
        "bus_unavailable", 503, ErrorCode.BUS_UNAVAILABLE, "message bus unavailable"
    ),
    ErrorCode.TUNNEL_BUSY: Failure(
        "agent_busy", 409, ErrorCode.AGENT_BUSY, "agent is busy with another session"
    ),
}


def failure_for(code: ErrorCode) -> Failure:
    """The table entry of ``code``; any other code is a 502 ``agent_error`` naming it."""
    known = FAILURES.get(code)
    if known is not None:
        return known
    return Failure(
        _AGENT_ERROR.reason,
        _AGENT_ERROR.status,
        _AGENT_ERROR.code,
        f"{_AGENT_ERROR.message} ({code.value})",
    )


def bus_error_to_api(exc: BusError) -> ApiError:
    """Map a bus failure to its HTTP answer (used by the handler and by the services)."""
    return failure_for(exc.code).error()


# refusals of work inside a session (terminal.command, shell.open): no session state changes
_WORK_REFUSALS: dict[ErrorCode, ApiError] = {
    ErrorCode.CWD_NOT_ALLOWED: Unprocessable("working directory not allowed"),
    ErrorCode.INVALID_COMMAND: Unprocessable("the agent refused the command"),
    ErrorCode.TOO_MANY_CHANNELS: TooManyRequests("the agent runs too many channels"),
    ErrorCode.NO_SUCH_SESSION: Conflict("the agent does not hold this session"),
}


def work_refusal(code: ErrorCode, message: str | None = None) -> ApiError:
    """The HTTP answer for an agent's refusal of a command or shell (``tunnel.error{code}``):
    422 ``cwd_not_allowed`` / ``invalid_command``, 429 ``too_many_channels``, 409 ``conflict``
    for ``no_such_session``, else the failure table (agent_offline 409, agent_timeout 504...)."""
    known = _WORK_REFUSALS.get(code)
    if known is None:
        return failure_for(code).error()
    api_code = ErrorCode.CONFLICT if code == ErrorCode.NO_SUCH_SESSION else code
    return type(known)(message or known.message, code=api_code)


# what a file transfer's refusal (tunnel.error) or failure (file.failed) answers over HTTP
FILE_STATUSES: dict[ErrorCode, int] = {
    ErrorCode.PATH_NOT_ALLOWED: 403,
    ErrorCode.FILE_NOT_FOUND: 404,
    ErrorCode.FILE_EXISTS: 409,
    ErrorCode.SESSION_CLOSED: 409,
    ErrorCode.FILE_TOO_LARGE: 413,
    ErrorCode.HASH_MISMATCH: 422,
    ErrorCode.IO_ERROR: 502,
    ErrorCode.NOT_IMPLEMENTED: 501,
    ErrorCode.AGENT_TIMEOUT: 504,
}


def file_refusal(code: ErrorCode, message: str) -> ApiError:
    """The HTTP answer for an agent's refusal or failure of a file transfer: the statuses of
    :data:`FILE_STATUSES` with the agent's code (403 ``path_not_allowed``, 404
    ``file_not_found``, 409 ``file_exists``, 413 ``file_too_large``, 422 ``hash_mismatch``,
    502 ``io_error``, 504 ``agent_timeout``...), else the work refusals (429
    ``too_many_channels``, 409 ``conflict``) and the failure table (502 ``agent_error`` for
    anything else, e.g. ``malformed_frame``, which would be a bug of the API or the agent)."""
    status = FILE_STATUSES.get(code)
    if status is not None:
        return FileRefused(status, code, message[:512])
    return work_refusal(code, message[:512])


def session_exists() -> Conflict:
    """The 409 for a second open while the agent has a pending or active session."""
    return Conflict("agent already has an open session", code=ErrorCode.SESSION_EXISTS)


# PostgreSQL SQLSTATEs that mean "no database to talk to right now" (not a bad statement):
# class 08 (connection exceptions), 53300 too many connections, 57P01-57P03 admin or crash
# shutdown and "the database system is starting up / shutting down" (asyncpg raises these as
# plain driver errors, which SQLAlchemy wraps as a bare DBAPIError, not an OperationalError)
_UNAVAILABLE_SQLSTATES = frozenset({"53300", "57P01", "57P02", "57P03"})


def _sqlstate(exc: sa_exc.DBAPIError) -> str:
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return state if isinstance(state, str) else ""


def is_database_unavailable(exc: BaseException) -> bool:
    """True for failures that mean "the database does not answer" rather than a bug."""
    if isinstance(exc, sa_exc.DBAPIError) and (
        exc.connection_invalidated
        or _sqlstate(exc).startswith("08")
        or _sqlstate(exc) in _UNAVAILABLE_SQLSTATES
    ):
        return True
    return isinstance(
        exc,
        sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError | OSError,
    )


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    # the message names the field and the rule, never the rejected input
    return f"{where}: {first.get('msg', 'invalid')}{more}"[:512]


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    headers = dict(exc.headers or {})
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(exc.status, exc.code, exc.message, headers or None)


async def _bus_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BusError)
    return await _api_error(request, bus_error_to_api(exc))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, ErrorCode.VALIDATION_ERROR, _validation_message(exc))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, ErrorCode.INTERNAL_ERROR)
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "error"
    message = exc.detail if isinstance(exc.detail, str) else phrase
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if is_database_unavailable(exc):
        log.warning("database unavailable", extra={"error": type(exc).__name__})
        return error_response(503, ErrorCode.DATABASE_UNAVAILABLE, "database unavailable")
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, ErrorCode.INTERNAL_ERROR, "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Register every mapping above on ``app``."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(BusError, _bus_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(sa_exc.SQLAlchemyError, _database_error)
    app.add_exception_handler(OSError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
