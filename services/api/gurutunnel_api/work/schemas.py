"""HTTP and WebSocket schemas of work inside a session (the README's "Inside a session").

Request bodies and client WebSocket messages refuse unknown fields. Output travels as standard
base64 (``WireBytes``) in NDJSON lines and WebSocket messages.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field, TypeAdapter, model_validator

from gurutunnel_protocol import Id
from gurutunnel_protocol.messages.base import WireBytes
from gurutunnel_protocol.messages.terminal import (
    MAX_ARGV_ITEMS,
    MAX_COMMAND_CHARS,
    MAX_PATH_CHARS,
    ExitReason,
    OutputStream,
)

from ..schemas import RequestModel

MAX_TIMEOUT_S = 86400.0
DEFAULT_TIMEOUT_S = 300.0
MAX_INPUT_BYTES = 64 * 1024
MAX_CLIENT_ID_CHARS = 128

Encoding = Literal["utf-8", "base64"]


class CommandSpec(RequestModel):
    """Exactly one of ``command`` (the agent's shell) and ``argv`` (no shell)."""

    command: str | None = Field(default=None, min_length=1, max_length=MAX_COMMAND_CHARS)
    argv: list[Annotated[str, Field(max_length=MAX_COMMAND_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_ARGV_ITEMS
    )
    cwd: str | None = Field(default=None, min_length=1, max_length=MAX_PATH_CHARS)
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S)
    max_output_bytes: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.command is None) == (self.argv is None):
            raise ValueError("exactly one of command or argv is required")
        return self


class ExecCreate(CommandSpec):
    """``POST /tunnel/{session_id}/exec``."""


class GapPublic(BaseModel):
    """Frames lost on the bus: the first and the last missing ``seq`` (inclusive)."""

    from_seq: int
    to_seq: int


class ExecResult(BaseModel):
    """The whole result of one command (full-result mode)."""

    channel_id: str
    stdout: str
    stderr: str
    encoding: Encoding
    exit_code: int | None
    reason: ExitReason
    truncated: bool
    duration_s: float
    stdout_bytes: int
    stderr_bytes: int
    gaps: list[GapPublic]
    error: str | None
    session_close_reason: str | None = None
    """Set when the command ended because its session closed: the session's close reason
    (``max_duration``, ``idle_timeout``, ``closed_by_user``, ``agent_disconnected`` ...)."""


class ExecCancelled(BaseModel):
    channel_id: str


class WsTicketPublic(BaseModel):
    ticket: str
    expires_in: int


# ---------------------------------------------------------------- NDJSON stream events
class StreamStarted(BaseModel):
    event: Literal["started"] = "started"
    channel_id: str
    pid: int | None


class StreamChunk(BaseModel):
    event: Literal["chunk"] = "chunk"
    seq: int
    stream: OutputStream
    data: WireBytes


class StreamGap(BaseModel):
    event: Literal["gap"] = "gap"
    from_seq: int
    to_seq: int


class ExitFields(BaseModel):
    seq: int
    reason: ExitReason
    exit_code: int | None
    truncated: bool
    duration_s: float
    stdout_bytes: int
    stderr_bytes: int
    error: str | None


class StreamExit(ExitFields):
    event: Literal["exit"] = "exit"
    session_close_reason: str | None = None
    """As in :class:`ExecResult`: why the session closed, when that ended the command."""


class StreamError(BaseModel):
    event: Literal["error"] = "error"
    code: str
    message: str
    session_close_reason: str | None = None
    """With ``code`` ``session_closed``: why the session closed."""


# ---------------------------------------------------------------- WebSocket, client -> server
ClientId = Annotated[str, Field(max_length=MAX_CLIENT_ID_CHARS)]


class WsExecIn(CommandSpec):
    type: Literal["exec"]
    id: ClientId | None = None


class WsShellIn(RequestModel):
    type: Literal["shell"]
    cols: int = Field(default=80, ge=1, le=1000)
    rows: int = Field(default=24, ge=1, le=1000)
    id: ClientId | None = None


class WsInputIn(RequestModel):
    type: Literal["input"]
    channel_id: Id
    data: Annotated[WireBytes, Field(max_length=MAX_INPUT_BYTES)]


class WsResizeIn(RequestModel):
    type: Literal["resize"]
    channel_id: Id
    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


class WsCancelIn(RequestModel):
    type: Literal["cancel"]
    channel_id: Id


class WsPingIn(RequestModel):
    type: Literal["ping"]


WsClientMessage = Annotated[
    WsExecIn | WsShellIn | WsInputIn | WsResizeIn | WsCancelIn | WsPingIn,
    Field(discriminator="type"),
]
ws_client_message: TypeAdapter[WsClientMessage] = TypeAdapter(WsClientMessage)


# ---------------------------------------------------------------- WebSocket, server -> client
class WsStartedOut(BaseModel):
    type: Literal["started"] = "started"
    id: str | None = None
    channel_id: str
    kind: Literal["exec", "shell"]
    pid: int | None = None


class WsChunkOut(BaseModel):
    type: Literal["chunk"] = "chunk"
    channel_id: str
    seq: int
    stream: OutputStream
    data: WireBytes


class WsGapOut(BaseModel):
    type: Literal["gap"] = "gap"
    channel_id: str
    from_seq: int
    to_seq: int


class WsExitOut(ExitFields):
    type: Literal["exit"] = "exit"
    channel_id: str


class WsErrorOut(BaseModel):
    type: Literal["error"] = "error"
    id: str | None = None
    channel_id: str | None = None
    code: str
    message: str


class WsPongOut(BaseModel):
    type: Literal["pong"] = "pong"


class WsSessionClosedOut(BaseModel):
    type: Literal["session.closed"] = "session.closed"
    reason: str


def ws_text(message: BaseModel) -> str:
    """A server message as its JSON text frame: optional ``id``/``pid``/``channel_id`` left out
    when unset; every field of ``exit`` always present."""
    if isinstance(message, WsExitOut):
        return message.model_dump_json()
    return message.model_dump_json(exclude_none=True)


def ndjson_line(event: BaseModel) -> bytes:
    """One NDJSON line (every field present, ``null`` when unset)."""
    return event.model_dump_json().encode() + b"\n"
