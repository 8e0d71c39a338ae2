"""Encode and decode every wire message: the one codec of gurutunnel.

Contract:
- ``encode(frame) -> bytes``: compact UTF-8 JSON (``model_dump_json``).
- ``encode_spliced(envelope, fields, frame_json) -> bytes``: an envelope (``SessionUp``,
  ``CommandReply``) around a frame's JSON as it was received and validated, not re-encoded.
- ``decode_*(raw) -> model``: ``raw`` is ``bytes`` or ``str`` of JSON; one module-level
  ``TypeAdapter`` per union validates it in one pass (``validate_json``). Any failure raises
  :class:`ProtocolError` with ``UNSUPPORTED_VERSION``, ``UNKNOWN_TYPE`` or ``MALFORMED_FRAME``,
  and a message short enough to send back in an error frame (never the whole input). Nothing
  else escapes: input the classifier itself cannot parse (e.g. JSON nested deeper than the
  interpreter's recursion limit) is ``MALFORMED_FRAME``.
- Size limits are the transport's job (WebSocket ``max_size``, NATS max payload); the decoder
  checks ``max_bytes`` only as a second line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import ErrorCode, ProtocolError
from .messages import (
    PROTOCOL_VERSION,
    AgentCommand,
    AgentToServer,
    ControlMessage,
    GatewayHeartbeat,
    PresenceEvent,
    ServerToAgent,
)
from .messages.bus import AgentHeartbeat, CommandFailed, CommandReply, SessionUp
from .messages.terminal import TerminalOutput

T = TypeVar("T")

DEFAULT_MAX_BYTES = 1 << 20

_server_to_agent: TypeAdapter[ServerToAgent] = TypeAdapter(ServerToAgent)
_agent_to_server: TypeAdapter[AgentToServer] = TypeAdapter(AgentToServer)
_agent_command: TypeAdapter[AgentCommand] = TypeAdapter(AgentCommand)
_presence: TypeAdapter[PresenceEvent] = TypeAdapter(PresenceEvent)
_control: TypeAdapter[ControlMessage] = TypeAdapter(ControlMessage)
_cmd_result: TypeAdapter[CommandReply | CommandFailed] = TypeAdapter(CommandReply | CommandFailed)
_session_up: TypeAdapter[SessionUp] = TypeAdapter(SessionUp)
_agent_heartbeat: TypeAdapter[AgentHeartbeat] = TypeAdapter(AgentHeartbeat)
_gateway_heartbeat: TypeAdapter[GatewayHeartbeat] = TypeAdapter(GatewayHeartbeat)


def encode(frame: BaseModel) -> bytes:
    """Serialize a message to compact JSON bytes."""
    return frame.model_dump_json().encode()


def encode_text(frame: BaseModel) -> str:
    """Serialize a message to a JSON string (for WebSocket text frames)."""
    return frame.model_dump_json()


def encode_spliced(
    envelope: type[BaseModel], fields: Mapping[str, str | int], frame_json: str | bytes
) -> bytes:
    """JSON of ``envelope`` with ``fields`` and ``frame_json`` spliced in as its ``frame``.

    For forwarding an agent frame without re-encoding it (base64 payloads included): the caller
    must have decoded ``frame_json`` with this module into a model that the envelope's
    ``frame`` field accepts. A receiver then validates the very text the caller validated, with
    the same models, so it gets the same frame: duplicate keys resolve the same way, unknown
    fields are ignored the same way (they travel on, like every field of a newer peer within
    the same protocol version). ``fields`` are the envelope's other fields, never ``type`` or
    ``v`` (set here) or ``frame``."""
    raw = frame_json.encode() if isinstance(frame_json, str) else frame_json
    return b"".join((spliced_head(envelope, fields), raw, b"}"))


def spliced_head(envelope: type[BaseModel], fields: Mapping[str, str | int]) -> bytes:
    """What :func:`encode_spliced` puts before the frame's JSON (which is then followed by
    ``}``): a sender that splices many frames into the same envelope fields builds it once."""
    if "frame" in fields or "type" in fields or "v" in fields:
        raise ValueError("fields must not hold type, v or frame")
    tag = envelope.model_fields["type"].default
    head = json.dumps(
        {"type": tag, "v": PROTOCOL_VERSION, **fields}, separators=(",", ":"), ensure_ascii=False
    ).encode()
    return head[:-1] + b',"frame":'


def _classify(raw: bytes | str, exc: ValidationError) -> ProtocolError:
    """Turn a validation failure into the most precise protocol error; never raises."""
    try:
        return _classify_precisely(raw, exc)
    except Exception:
        # json.loads raises RecursionError on deeply nested input that pydantic already
        # refused; whatever the cause, the frame is malformed and the caller must get a
        # ProtocolError, not an arbitrary exception that kills its reader loop.
        return ProtocolError(ErrorCode.MALFORMED_FRAME, "frame is not valid JSON")


def _classify_precisely(raw: bytes | str, exc: ValidationError) -> ProtocolError:
    try:
        obj: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return ProtocolError(ErrorCode.MALFORMED_FRAME, "frame is not valid JSON")
    if not isinstance(obj, dict):
        return ProtocolError(ErrorCode.MALFORMED_FRAME, "frame must be a JSON object")
    version = obj.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        return ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {str(version)[:16]!r} is not supported (want {PROTOCOL_VERSION})",
        )
    for err in exc.errors():
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            tag = obj.get("type")
            shown = str(tag)[:64] if tag is not None else "missing"
            return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown or missing frame type: {shown}")
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"][1:]) or "frame"
    return ProtocolError(ErrorCode.MALFORMED_FRAME, f"{where}: {first['msg']}"[:512])


def _decode(adapter: TypeAdapter[T], raw: bytes | str, max_bytes: int) -> T:
    if len(raw) > max_bytes:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"frame exceeds {max_bytes} bytes")
    try:
        value = adapter.validate_json(raw)
    except ValidationError as exc:
        raise _classify(raw, exc) from None
    if getattr(value, "v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION, f"protocol version must be {PROTOCOL_VERSION}"
        )
    return value


def decode_server_to_agent(raw: bytes | str, max_bytes: int = DEFAULT_MAX_BYTES) -> ServerToAgent:
    return _decode(_server_to_agent, raw, max_bytes)


def decode_agent_to_server(raw: bytes | str, max_bytes: int = DEFAULT_MAX_BYTES) -> AgentToServer:
    return _decode(_agent_to_server, raw, max_bytes)


def decode_agent_command(raw: bytes | str, max_bytes: int = DEFAULT_MAX_BYTES) -> AgentCommand:
    return _decode(_agent_command, raw, max_bytes)


def decode_presence(raw: bytes | str, max_bytes: int = DEFAULT_MAX_BYTES) -> PresenceEvent:
    return _decode(_presence, raw, max_bytes)


def decode_control(raw: bytes | str, max_bytes: int = DEFAULT_MAX_BYTES) -> ControlMessage:
    return _decode(_control, raw, max_bytes)


def decode_command_result(
    raw: bytes | str, max_bytes: int = DEFAULT_MAX_BYTES
) -> CommandReply | CommandFailed:
    return _decode(_cmd_result, raw, max_bytes)


def decode_session_up(raw: bytes | str, max_bytes: int = DEFAULT_MAX_BYTES) -> SessionUp:
    return _decode(_session_up, raw, max_bytes)


def decode_agent_heartbeat(raw: bytes | str, max_bytes: int = DEFAULT_MAX_BYTES) -> AgentHeartbeat:
    return _decode(_agent_heartbeat, raw, max_bytes)


def decode_gateway_heartbeat(
    raw: bytes | str, max_bytes: int = DEFAULT_MAX_BYTES
) -> GatewayHeartbeat:
    return _decode(_gateway_heartbeat, raw, max_bytes)


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every union, keyed by name (the source of ``docs/protocol.schema.json``)."""
    adapters: dict[str, TypeAdapter[Any]] = {
        "ServerToAgent": _server_to_agent,
        "AgentToServer": _agent_to_server,
        "AgentCommand": _agent_command,
        "PresenceEvent": _presence,
        "ControlMessage": _control,
        "CommandResult": _cmd_result,
        "SessionUp": _session_up,
        "AgentHeartbeat": _agent_heartbeat,
        "GatewayHeartbeat": _gateway_heartbeat,
        "TerminalOutput": TypeAdapter(TerminalOutput),
    }
    return {name: adapter.json_schema(mode="serialization") for name, adapter in adapters.items()}
