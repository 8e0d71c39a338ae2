"""Every wire message of gurutunnel, and the unions by direction.

- ``ServerToAgent``: what a gateway may send on an agent socket.
- ``AgentToServer``: what an agent may send on its socket.
- ``AgentCommand``: what the API may send to an agent through ``agent.<id>.cmd`` (the gateway
  forwards it as a ``ServerToAgent`` frame).
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
    GatewayStamp,
    PresenceEvent,
    SessionFrame,
    SessionUp,
)
from .control import ErrorFrame, Reconnect, Welcome
from .heartbeat import Heartbeat, HostMetrics
from .terminal import Terminal, TerminalOutput
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
    TunnelOpen | TunnelClose | TunnelData | ChannelOpen | ChannelClose | Terminal,
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
    | Terminal,
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
    | TerminalOutput,
    Field(discriminator="type"),
]

__all__ = [
    "PROTOCOL_VERSION",
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
    "Frame",
    "GatewayHeartbeat",
    "GatewayStamp",
    "Heartbeat",
    "HostMetrics",
    "PresenceEvent",
    "Reconnect",
    "ServerToAgent",
    "SessionFrame",
    "SessionUp",
    "Terminal",
    "TerminalOutput",
    "TunnelClose",
    "TunnelClosed",
    "TunnelData",
    "TunnelError",
    "TunnelOpen",
    "TunnelReady",
    "Welcome",
]
