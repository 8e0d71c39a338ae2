"""The agent's tunnel state machine: sans-I/O, no sockets, no clock.

Contract:
- Two modes: ``heartbeat`` (no session) and ``tunnel`` (exactly one session, opened by one
  technician). At most one session at a time; channels live only inside the session.
- Operations raise a :class:`TunnelStateError` subclass carrying the :class:`ErrorCode` that goes
  back on the wire::

    TunnelStateError         (code)
     +-- TunnelBusy          TUNNEL_BUSY      another session is open
     +-- NoSuchSession       NO_SUCH_SESSION  the frame names a session the agent does not hold
     +-- ChannelExists       CHANNEL_EXISTS   the channel id is already open in this session
     +-- NoSuchChannel       NO_SUCH_CHANNEL  the channel id is not open in this session
     +-- NotImplementedYet   NOT_IMPLEMENTED  a frame this version cannot serve

- ``handle(frame)`` turns one server frame into the frames to send back (never raises for a
  state error: it answers ``tunnel.error`` echoing ``req_id``). Connection-level frames
  (``welcome``, ``error``, ``reconnect``) are the client's business and yield no answer.
- ``open_tunnel`` for the session already open (same session and technician) is idempotent:
  a re-delivered ``tunnel.open`` is answered ``tunnel.ready`` again rather than refused.
- ``force_close()`` is called when the socket is lost: the session and its channels are
  dropped without an answer (the gateway reports the disconnect), back to heartbeat mode.
"""

from __future__ import annotations

from enum import StrEnum

from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages import (
    AgentToServer,
    ChannelClose,
    ChannelClosed,
    ChannelOpen,
    ChannelOpened,
    ChannelType,
    ErrorFrame,
    Reconnect,
    ServerToAgent,
    Terminal,
    TunnelClose,
    TunnelClosed,
    TunnelData,
    TunnelError,
    TunnelOpen,
    TunnelReady,
    Welcome,
)


class TunnelMode(StrEnum):
    HEARTBEAT = "heartbeat"
    TUNNEL = "tunnel"


class TunnelStateError(Exception):
    """A request the state machine refuses; ``code`` is sent back in ``tunnel.error``."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TunnelBusy(TunnelStateError):
    code = ErrorCode.TUNNEL_BUSY


class NoSuchSession(TunnelStateError):
    code = ErrorCode.NO_SUCH_SESSION


class ChannelExists(TunnelStateError):
    code = ErrorCode.CHANNEL_EXISTS


class NoSuchChannel(TunnelStateError):
    code = ErrorCode.NO_SUCH_CHANNEL


class NotImplementedYet(TunnelStateError):
    code = ErrorCode.NOT_IMPLEMENTED


class TunnelManager:
    """Mode, session and channels of one agent (the seed's Rust ``TunnelManager``)."""

    def __init__(self) -> None:
        self._session_id: str | None = None
        self._tech_id: str | None = None
        self._channels: dict[str, ChannelType] = {}

    @property
    def mode(self) -> TunnelMode:
        return TunnelMode.HEARTBEAT if self._session_id is None else TunnelMode.TUNNEL

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def tech_id(self) -> str | None:
        return self._tech_id

    @property
    def channels(self) -> dict[str, ChannelType]:
        """A copy of the open channels (id -> type)."""
        return dict(self._channels)

    # -- operations -------------------------------------------------------------------------

    def open_tunnel(self, session_id: str, tech_id: str) -> None:
        """Enter tunnel mode for ``session_id``; :class:`TunnelBusy` if another is open."""
        if self._session_id is not None:
            if self._session_id == session_id and self._tech_id == tech_id:
                return
            raise TunnelBusy("another tunnel session is already open")
        self._session_id = session_id
        self._tech_id = tech_id
        self._channels.clear()

    def close_tunnel(self, session_id: str) -> None:
        """Leave tunnel mode; :class:`NoSuchSession` unless ``session_id`` is the open one."""
        self._require_session(session_id)
        self._drop()

    def add_channel(self, channel_id: str, channel_type: ChannelType) -> None:
        """Open a channel in the current session (:class:`ChannelExists` if already open)."""
        if self._session_id is None:
            raise NoSuchSession("no tunnel session is open")
        if channel_id in self._channels:
            raise ChannelExists(f"channel {channel_id} is already open")
        self._channels[channel_id] = channel_type

    def remove_channel(self, channel_id: str) -> None:
        """Close a channel of the current session (:class:`NoSuchChannel` if not open)."""
        if channel_id not in self._channels:
            raise NoSuchChannel(f"channel {channel_id} is not open")
        del self._channels[channel_id]

    def force_close(self) -> str | None:
        """Drop session and channels (the socket is gone); returns the dropped session id."""
        dropped = self._session_id
        self._drop()
        return dropped

    def _drop(self) -> None:
        self._session_id = None
        self._tech_id = None
        self._channels.clear()

    def _require_session(self, session_id: str) -> None:
        if self._session_id is None:
            raise NoSuchSession("no tunnel session is open")
        if self._session_id != session_id:
            raise NoSuchSession("the agent does not hold that session")

    def _require_channel(self, session_id: str, channel_id: str) -> None:
        self._require_session(session_id)
        if channel_id not in self._channels:
            raise NoSuchChannel(f"channel {channel_id} is not open")

    # -- frames -----------------------------------------------------------------------------

    def handle(self, frame: ServerToAgent) -> list[AgentToServer]:
        """The frames to send in answer to ``frame`` (empty for connection-level frames)."""
        if isinstance(frame, Welcome | ErrorFrame | Reconnect):
            return []
        try:
            return self._dispatch(frame)
        except TunnelStateError as exc:
            return [
                TunnelError(
                    req_id=getattr(frame, "req_id", None),
                    session_id=frame.session_id,
                    channel_id=getattr(frame, "channel_id", None),
                    code=exc.code,
                    error=exc.message,
                    held_session_id=self._session_id if exc.code is ErrorCode.TUNNEL_BUSY else None,
                )
            ]

    def _dispatch(
        self, frame: TunnelOpen | TunnelClose | TunnelData | ChannelOpen | ChannelClose | Terminal
    ) -> list[AgentToServer]:
        match frame:
            case TunnelOpen():
                self.open_tunnel(frame.session_id, frame.tech_id)
                return [TunnelReady(req_id=frame.req_id, session_id=frame.session_id)]
            case TunnelClose():
                self.close_tunnel(frame.session_id)
                return [
                    TunnelClosed(
                        req_id=frame.req_id, session_id=frame.session_id, reason=frame.reason
                    )
                ]
            case ChannelOpen():
                self._require_session(frame.session_id)
                self.add_channel(frame.channel_id, frame.channel_type)
                return [
                    ChannelOpened(
                        req_id=frame.req_id,
                        session_id=frame.session_id,
                        channel_id=frame.channel_id,
                        channel_type=frame.channel_type,
                    )
                ]
            case ChannelClose():
                self._require_session(frame.session_id)
                self.remove_channel(frame.channel_id)
                return [
                    ChannelClosed(
                        req_id=frame.req_id,
                        session_id=frame.session_id,
                        channel_id=frame.channel_id,
                    )
                ]
            case Terminal() | TunnelData():
                # the seam for command execution (gurutunnel_agent.channels) is the next issue;
                # until then the request is refused visibly instead of being dropped
                self._require_channel(frame.session_id, frame.channel_id)
                raise NotImplementedYet(f"{frame.type} is not implemented by this agent version")
