"""Every wire message of gurutunnel, and the unions by direction.

- ``ServerToAgent``: what a gateway may send on an agent socket.
- ``AgentToServer``: what an agent may send on its socket.
- ``AgentCommand``: what the API may send towards an agent, the gateway forwarding it as a
  ``ServerToAgent`` frame: the requests of ``REQUEST_TYPES`` (with a ``req_id``, on
  ``agent.<id>.cmd``, each answered by one of ``REPLIES_BY_REQUEST[type]``) and the fire-and-forget
  frames of ``SESSION_DOWN_TYPES`` (on ``session.<id>.down``).
- Bus messages (gateway <-> api) live in :mod:`.bus`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .base import PROTOCOL_VERSION, Frame
from .bus import (
    AgentConnected,
    AgentDisconnected,
    AgentHeartbeat,
    AgentReply,
    AgentRevoked,
    CommandFailed,
    CommandReply,
    ConnectionTakeover,
    ControlMessage,
    DisconnectReason,
    GatewayHeartbeat,
    GatewayLeaseLost,
    GatewayStamp,
    PresenceEvent,
    SessionFrame,
    SessionUp,
)
from .control import ErrorFrame, Reconnect, Welcome
from .files import (
    FileAck,
    FileCancel,
    FileChunk,
    FileDone,
    FileDownload,
    FileFailed,
    FileReady,
    FileUpload,
)
from .heartbeat import Heartbeat, HostMetrics
from .terminal import (
    CHUNK_COST_BYTES,
    MAX_INLINE_CHUNKS,
    MAX_WINDOW_BYTES,
    MIN_WINDOW_BYTES,
    ExitReason,
    OutputStream,
    ShellOpen,
    ShellResize,
    Terminal,
    TerminalAck,
    TerminalCancel,
    TerminalChunk,
    TerminalExit,
    TerminalOutput,
    TerminalStarted,
    chunk_cost,
)
from .tunnel import (
    ChannelClose,
    ChannelClosed,
    ChannelOpen,
    ChannelOpened,
    ChannelType,
    TunnelClose,
    TunnelClosed,
    TunnelData,
    TunnelError,
    TunnelOpen,
    TunnelReady,
)

AgentCommand = Annotated[
    TunnelOpen
    | TunnelClose
    | TunnelData
    | ChannelOpen
    | ChannelClose
    | Terminal
    | TerminalCancel
    | TerminalAck
    | ShellOpen
    | ShellResize
    | FileUpload
    | FileDownload
    | FileChunk
    | FileAck
    | FileCancel,
    Field(discriminator="type"),
]

ServerToAgent = Annotated[
    Welcome
    | ErrorFrame
    | Reconnect
    | TunnelOpen
    | TunnelClose
    | TunnelData
    | ChannelOpen
    | ChannelClose
    | Terminal
    | TerminalCancel
    | TerminalAck
    | ShellOpen
    | ShellResize
    | FileUpload
    | FileDownload
    | FileChunk
    | FileAck
    | FileCancel,
    Field(discriminator="type"),
]

AgentToServer = Annotated[
    Heartbeat
    | TunnelReady
    | TunnelClosed
    | TunnelData
    | TunnelError
    | ChannelOpened
    | ChannelClosed
    | TerminalStarted
    | TerminalChunk
    | TerminalExit
    | FileReady
    | FileChunk
    | FileAck
    | FileDone
    | FileFailed,
    Field(discriminator="type"),
]

REPLY_TYPES = (
    TunnelReady,
    TunnelClosed,
    TunnelError,
    ChannelOpened,
    ChannelClosed,
    TerminalStarted,
    FileReady,
)
"""Agent frames that answer a request (the ``AgentReply`` union)."""

REPLIES_BY_REQUEST: dict[str, tuple[type[Frame], ...]] = {
    "tunnel.open": (TunnelReady, TunnelError),
    "tunnel.close": (TunnelClosed, TunnelError),
    "channel.open": (ChannelOpened, TunnelError),
    "channel.close": (ChannelClosed, TunnelError),
    "terminal.command": (TerminalStarted, TunnelError),
    "shell.open": (ChannelOpened, TunnelError),
    "file.upload": (FileReady, TunnelError),
    "file.download": (FileReady, TunnelError),
}
"""For each request (by ``type``), the agent frames that answer it (echoing its ``req_id``)."""

REQUEST_TYPES = (
    TunnelOpen,
    TunnelClose,
    ChannelOpen,
    ChannelClose,
    Terminal,
    ShellOpen,
    FileUpload,
    FileDownload,
)
"""Requests: sent on ``agent.<id>.cmd`` with a ``req_id`` and answered exactly once."""

SESSION_DOWN_TYPES = (
    TunnelData,
    TerminalCancel,
    TerminalAck,
    ShellResize,
    ChannelClose,
    FileChunk,
    FileAck,
    FileCancel,
)
"""Frames the API publishes on ``session.<id>.down`` (no answer): technician input and the
data side of file transfers (upload chunks, download acks, cancel)."""

SESSION_UP_TYPES = (
    TunnelData,
    TunnelError,
    TunnelClosed,
    ChannelOpened,
    ChannelClosed,
    TerminalChunk,
    TerminalExit,
    FileChunk,
    FileAck,
    FileDone,
    FileFailed,
)
"""Agent frames a gateway relays on ``session.<id>.up`` (the ``SessionFrame`` union)."""

__all__ = [
    "CHUNK_COST_BYTES",
    "MAX_INLINE_CHUNKS",
    "MAX_WINDOW_BYTES",
    "MIN_WINDOW_BYTES",
    "PROTOCOL_VERSION",
    "REPLIES_BY_REQUEST",
    "REPLY_TYPES",
    "REQUEST_TYPES",
    "SESSION_DOWN_TYPES",
    "SESSION_UP_TYPES",
    "AgentCommand",
    "AgentConnected",
    "AgentDisconnected",
    "AgentHeartbeat",
    "AgentReply",
    "AgentRevoked",
    "AgentToServer",
    "ChannelClose",
    "ChannelClosed",
    "ChannelOpen",
    "ChannelOpened",
    "ChannelType",
    "CommandFailed",
    "CommandReply",
    "ConnectionTakeover",
    "ControlMessage",
    "DisconnectReason",
    "ErrorFrame",
    "ExitReason",
    "FileAck",
    "FileCancel",
    "FileChunk",
    "FileDone",
    "FileDownload",
    "FileFailed",
    "FileReady",
    "FileUpload",
    "Frame",
    "GatewayHeartbeat",
    "GatewayLeaseLost",
    "GatewayStamp",
    "Heartbeat",
    "HostMetrics",
    "OutputStream",
    "PresenceEvent",
    "Reconnect",
    "ServerToAgent",
    "SessionFrame",
    "SessionUp",
    "ShellOpen",
    "ShellResize",
    "Terminal",
    "TerminalAck",
    "TerminalCancel",
    "TerminalChunk",
    "TerminalExit",
    "TerminalOutput",
    "TerminalStarted",
    "TunnelClose",
    "TunnelClosed",
    "TunnelData",
    "TunnelError",
    "TunnelOpen",
    "TunnelReady",
    "Welcome",
    "chunk_cost",
]
