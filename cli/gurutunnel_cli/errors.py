"""Errors of the command line and the exit codes they end the process with.

Contract: every failure the CLI knows about is a ``CliError``; ``main`` renders it as one line
``gurutunnel: <code>: <message>`` on stderr and exits with its ``exit_code`` (never a traceback).

    CliError                 exit 1 unless said otherwise
     +-- ApiError            the API answered ``{"error": {"code", "message"}}`` (or a non-2xx)
     |    +-- AuthError      401, or no/expired stored token: exit 3, "run gurutunnel login"
     +-- NetworkError        the API could not be reached or the transfer broke; names the URL

Exit codes of ``exec`` and ``shell`` follow the remote command (see ``exit_code_for``).
"""

from __future__ import annotations

from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages.terminal import ExitReason

EXIT_ERROR = 1
EXIT_AUTH = 3
EXIT_TIMEOUT = 124
EXIT_SPAWN_FAILED = 127
EXIT_CANCELLED = 130
EXIT_SESSION_CLOSED = 255

LOGIN_HINT = "run gurutunnel login"


class CliError(Exception):
    """A failure the CLI reports as one line and an exit code."""

    exit_code = EXIT_ERROR

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def render(self) -> str:
        return f"gurutunnel: {self.code}: {self.message}"


class ApiError(CliError):
    """The API refused a request (``status`` is its HTTP status)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


class AuthError(ApiError):
    """No usable token: missing, expired, or rejected by the API."""

    exit_code = EXIT_AUTH

    def __init__(self, message: str, status: int = 401) -> None:
        if LOGIN_HINT not in message:
            message = f"{message}; {LOGIN_HINT}"
        super().__init__(status, ErrorCode.UNAUTHORIZED.value, message)


class NetworkError(CliError):
    """The request to ``url`` failed below HTTP (refused, reset, timed out)."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__("network_error", f"{url}: {detail}")
        self.url = url


def exit_code_for(reason: str, exit_code: int | None) -> int:
    """The CLI's exit code for a remote command's exit frame.

    ``exited`` gives the command's own code (a negative code, killed by signal N, gives 128+N,
    as a local shell would; codes outside 0-255 give 255); ``timeout`` 124, ``cancelled`` 130,
    ``spawn_failed`` 127, ``session_closed`` 255; an unknown reason 255.
    """
    if reason == ExitReason.EXITED:
        if exit_code is None:
            return EXIT_SESSION_CLOSED
        if exit_code < 0:
            return min(128 - exit_code, 255)
        return exit_code if exit_code <= 255 else 255
    return _REASON_EXIT_CODES.get(reason, EXIT_SESSION_CLOSED)


_REASON_EXIT_CODES: dict[str, int] = {
    ExitReason.TIMEOUT.value: EXIT_TIMEOUT,
    ExitReason.CANCELLED.value: EXIT_CANCELLED,
    ExitReason.SPAWN_FAILED.value: EXIT_SPAWN_FAILED,
    ExitReason.SESSION_CLOSED.value: EXIT_SESSION_CLOSED,
}
