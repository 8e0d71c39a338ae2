"""Tunnel session frames: open, ready, close, data and errors.

Request/response correlation: a server->agent request carries ``req_id``; the agent's answer
(``tunnel.ready``, ``tunnel.closed``, ``channel.opened``, ``channel.closed``, ``tunnel.error``,
``terminal.output``) echoes it. The gateway uses it to answer the API's NATS request.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from ..errors import ErrorCode
from ..ids import Id
from .base import Frame, WireBytes
from .terminal import MAX_WINDOW_BYTES, MIN_WINDOW_BYTES


class ChannelType(StrEnum):
    """Kinds of channel multiplexed inside a session."""

    TERMINAL = "terminal"
    SHELL = "shell"
    FILE = "file"
    REGISTRY = "registry"
    SERVICE = "service"


class TunnelOpen(Frame):
    """server -> agent: enter tunnel mode for ``session_id``; answered by ready or error."""

    type: Literal["tunnel.open"] = "tunnel.open"
    req_id: Id | None = None
    session_id: Id
    tech_id: Id


class TunnelClose(Frame):
    """server -> agent: leave tunnel mode, kill what the session started."""

    type: Literal["tunnel.close"] = "tunnel.close"
    req_id: Id | None = None
    session_id: Id
    reason: str = Field(default="user", max_length=64)


class TunnelData(Frame):
    """Both directions: bytes of one channel. ``data`` is base64 in JSON."""

    type: Literal["tunnel.data"] = "tunnel.data"
    session_id: Id
    channel_id: Id
    data: WireBytes


class TunnelReady(Frame):
    """agent -> server: the agent is in tunnel mode for ``session_id``."""

    type: Literal["tunnel.ready"] = "tunnel.ready"
    req_id: Id | None = None
    session_id: Id


class TunnelClosed(Frame):
    """agent -> server: the agent left tunnel mode (answer to close, or on its own)."""

    type: Literal["tunnel.closed"] = "tunnel.closed"
    req_id: Id | None = None
    session_id: Id
    reason: str = Field(default="user", max_length=64)


class TunnelError(Frame):
    """agent -> server: a request failed; ``code`` is an :class:`ErrorCode` value."""

    type: Literal["tunnel.error"] = "tunnel.error"
    req_id: Id | None = None
    session_id: Id | None = None
    channel_id: Id | None = None
    code: ErrorCode
    error: str = Field(max_length=1024)
    held_session_id: Id | None = None
    """With ``tunnel_busy``: the session the agent holds, so the server can close a zombie."""


class ChannelOpen(Frame):
    """server -> agent: open a channel of ``channel_type`` inside the session."""

    type: Literal["channel.open"] = "channel.open"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    channel_type: ChannelType


class ChannelOpened(Frame):
    """agent -> server: the channel exists."""

    type: Literal["channel.opened"] = "channel.opened"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    channel_type: ChannelType
    window_bytes: int | None = Field(default=None, ge=MIN_WINDOW_BYTES, le=MAX_WINDOW_BYTES)
    """A shell's output window, echoed from ``shell.open`` (see ``terminal``'s flow control)."""


class ChannelClose(Frame):
    """server -> agent: close one channel."""

    type: Literal["channel.close"] = "channel.close"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id


class ChannelClosed(Frame):
    """agent -> server: the channel is gone."""

    type: Literal["channel.closed"] = "channel.closed"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
