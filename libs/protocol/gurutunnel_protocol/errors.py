"""Error codes and WebSocket close codes shared by every part of gurutunnel.

Contract:
- ``ErrorCode`` values travel in ``error`` frames (gateway -> agent), ``tunnel.error`` frames
  (agent -> server), bus replies (gateway -> api) and the API's JSON errors
  ``{"error": {"code", "message"}}``. They are stable strings; new ones may be added, none renamed.
- ``CloseCode`` values are the WebSocket close codes a gateway uses on an agent socket. They are
  grouped in documented ranges so that an agent written in any language can decide what to do
  without knowing every code:

  ====================  ==========================================================
  range                 meaning for the agent
  ====================  ==========================================================
  1000-2999             standard RFC 6455 codes: reconnect with backoff
  4000-4499             gurutunnel "reconnect" range: reconnect with backoff
  4500-4999             gurutunnel "give up" range: fatal, stop and report
  ====================  ==========================================================

- Exceptions raised by protocol helpers::

    ProtocolError            a frame or id that breaks the protocol (carries an ErrorCode)
     +-- InvalidIdError      an id that cannot enter a NATS subject
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """Stable machine-readable error codes (wire frames, bus replies and HTTP errors)."""

    # frames
    MALFORMED_FRAME = "malformed_frame"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    FRAME_TOO_LARGE = "frame_too_large"
    NOT_YOUR_SESSION = "not_your_session"
    RATE_LIMITED = "rate_limited"
    # agent-side tunnel state machine
    TUNNEL_BUSY = "tunnel_busy"
    NO_SUCH_SESSION = "no_such_session"
    CHANNEL_EXISTS = "channel_exists"
    NO_SUCH_CHANNEL = "no_such_channel"
    NOT_IMPLEMENTED = "not_implemented"
    CWD_NOT_ALLOWED = "cwd_not_allowed"
    INVALID_COMMAND = "invalid_command"
    TOO_MANY_CHANNELS = "too_many_channels"
    PATH_NOT_ALLOWED = "path_not_allowed"
    FILE_NOT_FOUND = "file_not_found"
    FILE_EXISTS = "file_exists"
    FILE_TOO_LARGE = "file_too_large"
    HASH_MISMATCH = "hash_mismatch"
    IO_ERROR = "io_error"
    # gateway / bus
    AGENT_OFFLINE = "agent_offline"
    AGENT_TIMEOUT = "agent_timeout"
    AGENT_BACKPRESSURE = "agent_backpressure"
    BUS_UNAVAILABLE = "bus_unavailable"
    # HTTP API
    VALIDATION_ERROR = "validation_error"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    SESSION_EXISTS = "session_exists"
    AGENT_BUSY = "agent_busy"
    AGENT_ERROR = "agent_error"
    CONFLICT = "conflict"
    SESSION_CLOSED = "session_closed"
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
    DATABASE_UNAVAILABLE = "database_unavailable"
    SERVICE_UNAVAILABLE = "service_unavailable"
    INTERNAL_ERROR = "internal_error"


class CloseCode(IntEnum):
    """WebSocket close codes a gateway sends to an agent (see module docstring for ranges)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    # reconnect range
    REPLACED = 4000
    """A newer connection of the same agent took over."""
    DRAINING = 4001
    """The gateway is shutting down; reconnect elsewhere after the jittered delay it sent."""
    LEASE_LOST = 4002
    """The gateway lost its lease with the API; reconnect (possibly to another gateway)."""
    TOO_MANY_ERRORS = 4003
    """Too many malformed frames in a row."""
    BACKPRESSURE = 4004
    """The agent did not read its frames fast enough; the send queue overflowed."""
    # give-up range
    UNAUTHORIZED = 4500
    """The credential is missing, invalid or expired."""
    REVOKED = 4501
    """The agent was revoked by an admin."""
    UNSUPPORTED_VERSION = 4502
    """The agent speaks a protocol version this gateway does not."""


RECONNECT_RANGE = range(4000, 4500)
FATAL_RANGE = range(4500, 5000)


def close_is_fatal(code: int | None) -> bool:
    """True when an agent must stop instead of reconnecting after this close code."""
    return code is not None and code in FATAL_RANGE


class ProtocolError(Exception):
    """A frame, id or subject that breaks the protocol."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidIdError(ProtocolError, ValueError):
    """An id that cannot be used inside a NATS subject."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.MALFORMED_FRAME, message)
