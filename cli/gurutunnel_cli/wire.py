"""The technician API's exec stream and WebSocket messages, as the CLI reads and writes them.

Contract (the README's "Inside a session": "One-shot command", "NDJSON", "WebSocket"): NDJSON stream
lines are tagged by ``event``, WebSocket messages by ``type``; both carry output as standard base64
(``WireBytes`` from the protocol package). Unknown fields are ignored so a newer API may add some; a
line or message of an unknown kind decodes to ``None`` and is skipped by the callers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gurutunnel_protocol.messages.base import WireBytes
from gurutunnel_protocol.messages.terminal import OutputStream


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- shared bodies
class ExitFields(_In):
    seq: int | None = None
    reason: str
    exit_code: int | None = None
    truncated: bool = False
    duration_s: float | None = None
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    error: str | None = None


# ---------------------------------------------------------------- NDJSON exec stream
class StreamStarted(_In):
    event: Literal["started"]
    channel_id: str
    pid: int | None = None


class StreamChunk(_In):
    event: Literal["chunk"]
    seq: int
    stream: OutputStream
    data: WireBytes


class StreamGap(_In):
    event: Literal["gap"]
    from_seq: int
    to_seq: int


class StreamExit(ExitFields):
    event: Literal["exit"]


class StreamError(_In):
    event: Literal["error"]
    code: str
    message: str


StreamEvent = Annotated[
    StreamStarted | StreamChunk | StreamGap | StreamExit | StreamError,
    Field(discriminator="event"),
]
_stream_event: TypeAdapter[StreamEvent] = TypeAdapter(StreamEvent)


def decode_stream_line(line: str | bytes) -> StreamEvent | None:
    """One NDJSON line; ``None`` for an event kind this CLI does not know."""
    try:
        return _stream_event.validate_json(line)
    except ValidationError as exc:
        if any(e["type"] == "union_tag_invalid" for e in exc.errors()):
            return None
        raise


# ---------------------------------------------------------------- WebSocket, server -> client
class WsStarted(_In):
    type: Literal["started"]
    id: str | None = None
    channel_id: str
    kind: str
    pid: int | None = None


class WsChunk(_In):
    type: Literal["chunk"]
    channel_id: str
    seq: int
    stream: OutputStream
    data: WireBytes


class WsGap(_In):
    type: Literal["gap"]
    channel_id: str
    from_seq: int
    to_seq: int


class WsExit(ExitFields):
    type: Literal["exit"]
    channel_id: str


class WsError(_In):
    type: Literal["error"]
    id: str | None = None
    channel_id: str | None = None
    code: str
    message: str


class WsPong(_In):
    type: Literal["pong"]


class WsSessionClosed(_In):
    type: Literal["session.closed"]
    reason: str | None = None


WsServerMessage = Annotated[
    WsStarted | WsChunk | WsGap | WsExit | WsError | WsPong | WsSessionClosed,
    Field(discriminator="type"),
]
_ws_message: TypeAdapter[WsServerMessage] = TypeAdapter(WsServerMessage)


def decode_ws_message(raw: str | bytes) -> WsServerMessage | None:
    """One server message; ``None`` for a message type this CLI does not know."""
    try:
        return _ws_message.validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "union_tag_invalid" for e in exc.errors()):
            return None
        raise


# ---------------------------------------------------------------- WebSocket, client -> server
class WsShellOpen(_Out):
    type: Literal["shell"] = "shell"
    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)
    id: str | None = None


class WsInput(_Out):
    type: Literal["input"] = "input"
    channel_id: str
    data: WireBytes


class WsResize(_Out):
    type: Literal["resize"] = "resize"
    channel_id: str
    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


class WsCancel(_Out):
    type: Literal["cancel"] = "cancel"
    channel_id: str


def encode(message: _Out) -> str:
    """A client message as the JSON text frame the API expects (unset optionals left out)."""
    return message.model_dump_json(exclude_none=True)


def gap_notice(from_seq: int, to_seq: int) -> str:
    """The line the CLI shows for lost frames ``from_seq..to_seq`` (inclusive)."""
    return f"[gurutunnel: {max(to_seq - from_seq + 1, 1)} output frames lost]"
