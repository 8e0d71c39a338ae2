"""Bus messages between gateways and API replicas (never seen by agents).

Every message that a gateway publishes carries the identity from the agent's credential
(``agent_id``), the connection it came from (``conn_id``) and the gateway (``gateway_id`` and
``boot_id``), so a receiver can fence stale events.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from ..errors import ErrorCode
from ..ids import Id
from .base import Frame
from .files import FileAck, FileChunk, FileDone, FileFailed, FileReady
from .heartbeat import HostMetrics
from .terminal import TerminalChunk, TerminalExit, TerminalStarted
from .tunnel import (
    ChannelClosed,
    ChannelOpened,
    TunnelClosed,
    TunnelData,
    TunnelError,
    TunnelReady,
)


class GatewayStamp(Frame):
    """Fields every gateway publication carries."""

    agent_id: Id
    gateway_id: Id
    boot_id: Id
    conn_id: Id


class AgentConnected(GatewayStamp):
    """gateway -> api (``presence.<agent_id>``, JetStream): a connection was authenticated."""

    type: Literal["presence.connected"] = "presence.connected"
    event_id: Id
    at: datetime
    remote_addr: str | None = Field(default=None, max_length=128)


class DisconnectReason(StrEnum):
    CLOSED = "closed"
    """The socket closed (either side, clean or abrupt)."""
    REPLACED = "replaced"
    """A newer connection of the same agent took over."""
    PING_TIMEOUT = "ping_timeout"
    """No pong within the ping timeout (half-open link)."""
    SHUTDOWN = "shutdown"
    """The gateway is draining."""
    LEASE_LOST = "lease_lost"
    """The gateway lost its lease and dropped its sockets."""
    REVOKED = "revoked"


class AgentDisconnected(GatewayStamp):
    """gateway -> api (``presence.<agent_id>``, JetStream): a connection ended."""

    type: Literal["presence.disconnected"] = "presence.disconnected"
    event_id: Id
    at: datetime
    reason: DisconnectReason
    close_code: int | None = None


PresenceEvent = Annotated[AgentConnected | AgentDisconnected, Field(discriminator="type")]


class AgentHeartbeat(GatewayStamp):
    """gateway -> api (``agent.<agent_id>.evt.heartbeat``): an agent heartbeat, stamped."""

    type: Literal["agent.heartbeat"] = "agent.heartbeat"
    at: datetime
    mode: Literal["heartbeat", "tunnel"]
    session_id: Id | None = None
    metrics: HostMetrics


class GatewayHeartbeat(Frame):
    """gateway -> api (``gateway.heartbeat``): the gateway's liveness lease."""

    type: Literal["gateway.heartbeat"] = "gateway.heartbeat"
    gateway_id: Id
    boot_id: Id
    at: datetime
    agents: int = Field(ge=0)
    draining: bool = False
    lease_ttl_s: float = Field(gt=0)


AgentReply = Annotated[
    TunnelReady
    | TunnelClosed
    | TunnelError
    | ChannelOpened
    | ChannelClosed
    | TerminalStarted
    | FileReady,
    Field(discriminator="type"),
]


class CommandReply(GatewayStamp):
    """gateway -> api: reply to a request on ``agent.<id>.cmd`` carrying the agent's answer."""

    type: Literal["cmd.reply"] = "cmd.reply"
    frame: AgentReply


class CommandFailed(Frame):
    """gateway -> api: reply to a request on ``agent.<id>.cmd`` that never reached the agent."""

    type: Literal["cmd.failed"] = "cmd.failed"
    agent_id: Id
    gateway_id: Id
    code: ErrorCode
    message: str = Field(max_length=1024)


SessionFrame = Annotated[
    TunnelData
    | TunnelError
    | TunnelClosed
    | ChannelOpened
    | ChannelClosed
    | TerminalChunk
    | TerminalExit
    | FileChunk
    | FileAck
    | FileDone
    | FileFailed,
    Field(discriminator="type"),
]


class SessionUp(GatewayStamp):
    """gateway -> api (``session.<id>.up``): one agent frame of a session, numbered per conn."""

    type: Literal["session.up"] = "session.up"
    session_id: Id
    seq: int = Field(ge=0)
    frame: SessionFrame


class AgentRevoked(Frame):
    """api -> gateways (``gateway.control``): cut this agent off now and refuse it from now on."""

    type: Literal["control.revoke"] = "control.revoke"
    agent_id: Id
    not_before: datetime = Field(
        description="credentials issued before this instant are refused (re-enrolment issues new)"
    )


class ConnectionTakeover(GatewayStamp):
    """gateway -> gateways (``gateway.control``, core NATS): ``conn_id`` claims the agent.

    Sent once the connection's ``presence.connected`` is in the presence stream.
    ``connected_seq`` is that event's stream sequence: the one total order that every gateway
    and the API agree on without a database. The connection with the highest sequence is the
    agent's; a gateway holding a connection of the agent with a lower sequence closes it with
    ``CloseCode.REPLACED``, and a notice with a lower sequence than its own is ignored.
    """

    type: Literal["control.takeover"] = "control.takeover"
    connected_seq: int = Field(ge=1)
    at: datetime


class GatewayLeaseLost(Frame):
    """api -> gateways (``gateway.control``): the lease of this gateway boot was declared lost.

    An API sends it when a heartbeat arrives from a boot whose lease it already declared lost
    (the gateway did not notice: a pause shorter than its own check, a database outage on the
    API's side). The gateway whose current boot it names fences itself as if it had found the
    lease lost on its own: every agent socket closes ``CloseCode.LEASE_LOST`` and a new boot
    starts a fresh lease. Other gateways ignore it.
    """

    type: Literal["control.lease_lost"] = "control.lease_lost"
    gateway_id: Id
    boot_id: Id


ControlMessage = Annotated[
    AgentRevoked | ConnectionTakeover | GatewayLeaseLost, Field(discriminator="type")
]

__all__ = [
    "AgentConnected",
    "AgentDisconnected",
    "AgentHeartbeat",
    "AgentReply",
    "AgentRevoked",
    "CommandFailed",
    "CommandReply",
    "ConnectionTakeover",
    "ControlMessage",
    "DisconnectReason",
    "GatewayHeartbeat",
    "GatewayLeaseLost",
    "GatewayStamp",
    "PresenceEvent",
    "SessionFrame",
    "SessionUp",
]
