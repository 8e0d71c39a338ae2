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
     +-- TooManyChannels     TOO_MANY_CHANNELS  the session has ``max_channels`` channels open
     +-- CwdNotAllowed       CWD_NOT_ALLOWED  the working directory is outside the allowlist
     +-- InvalidCommand      INVALID_COMMAND  the command cannot be run as given

- ``handle(frame)`` turns one server frame into what the client must do, in order: frames to
  send and :data:`Action` s to carry out (never raises for a state error: it answers
  ``tunnel.error`` echoing ``req_id``). Connection-level frames (``welcome``, ``error``,
  ``reconnect``) are the client's business and yield nothing.
- Channels that run something (the I/O lives in ``gurutunnel_agent.channels``; the client runs
  their tasks and owns their lifetimes):

  * ``terminal.command``: session held, channel id unused, fewer than ``max_channels`` open,
    command valid (:func:`check_command`; ``cwd``, if given, absolute and without NUL) -> the
    channel is registered and :class:`StartCommand` returned. The client then checks the
    working directory against the allowlist on a worker thread (filesystem calls, bounded:
    they must not block this loop), answers ``tunnel.error{cwd_not_allowed}`` and releases the
    channel if refused, else starts the process and answers ``terminal.started``.
  * ``shell.open``: the same checks (cwd: the default one) -> :class:`StartShell`; the client
    answers ``channel.opened{shell}``. ``not_implemented`` where PTYs are unsupported.
  * ``terminal.ack`` -> :class:`OutputAcked` only on a running command or shell of the session
    held; anything else (the ack of a channel that just ended) is dropped without an answer.
  * ``terminal.cancel`` -> :class:`StopChannel` (``cancelled``, not awaited, no answer);
    ``tunnel.data`` on a shell -> :class:`ShellInput`; ``shell.resize`` -> :class:`ResizeShell`.
  * ``file.upload`` / ``file.download``: the same checks as ``terminal.command`` (session held,
    channel id unused, fewer than ``max_channels`` open) -> the channel is registered (type
    ``file``, direction remembered) and :class:`StartUpload` / :class:`StartDownload`
    returned; the client's file runtime answers the request itself (``file.ready`` or
    ``tunnel.error``). ``file.chunk`` -> :class:`FileData` only on an open upload channel,
    ``file.ack`` -> :class:`FileAcked` only on an open download channel; anything else (a
    late frame of a finished transfer, the wrong direction, another session) is dropped
    without an answer. ``file.cancel`` on an open file channel -> :class:`StopChannel`
    (``cancelled``, not awaited, no answer; the runtime ends with ``file.failed
    {session_closed}``), else dropped.
  * ``channel.close`` -> :class:`StopChannel` (awaited) then ``channel.closed``;
    ``tunnel.close`` -> :class:`EndSession` (every channel ends ``session_closed``, its process
    tree killed) then ``tunnel.closed``.
  * Every registration gets a new ``token`` (carried by the action); a finished channel is
    released by the client with :meth:`TunnelManager.release_channel` and that token, so its id
    may be used again, and a late release of an old channel never frees a newer one that
    reuses the id.
- ``open_tunnel`` for the session already open (same session and technician) is idempotent:
  a re-delivered ``tunnel.open`` is answered ``tunnel.ready`` again rather than refused.
- ``force_close()`` is called when the socket is lost: the session and its channels are
  dropped without an answer (the gateway reports the disconnect), back to heartbeat mode.
"""

from __future__ import annotations

import ntpath
import posixpath
import sys
from dataclasses import dataclass
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
    ExitReason,
    FileAck,
    FileCancel,
    FileChunk,
    FileDownload,
    FileUpload,
    Reconnect,
    ServerToAgent,
    ShellOpen,
    ShellResize,
    Terminal,
    TerminalAck,
    TerminalCancel,
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


class TooManyChannels(TunnelStateError):
    code = ErrorCode.TOO_MANY_CHANNELS


class CwdNotAllowed(TunnelStateError):
    code = ErrorCode.CWD_NOT_ALLOWED


class InvalidCommand(TunnelStateError):
    code = ErrorCode.INVALID_COMMAND


# -- actions: what the client must carry out (the I/O half of a frame) ---------------------


@dataclass(frozen=True)
class StartCommand:
    """Check ``frame.cwd``, spawn the command, answer ``terminal.started`` (see ``token``)."""

    frame: Terminal
    token: int
    """Identifies this registration of the channel id (for :meth:`release_channel`)."""


@dataclass(frozen=True)
class StartShell:
    """Open a PTY shell in the default directory, answer ``channel.opened{shell}``."""

    frame: ShellOpen
    token: int


@dataclass(frozen=True)
class StartUpload:
    """Run an upload channel for ``frame`` (it answers ``file.ready`` or ``tunnel.error``)."""

    frame: FileUpload
    token: int


@dataclass(frozen=True)
class StartDownload:
    """Run a download channel for ``frame`` (it answers ``file.ready`` or ``tunnel.error``)."""

    frame: FileDownload
    token: int


@dataclass(frozen=True)
class FileData:
    """Hand an upload's ``file.chunk`` to its channel."""

    session_id: str
    channel_id: str
    frame: FileChunk


@dataclass(frozen=True)
class FileAcked:
    """The server acknowledged a download's bytes before ``offset``."""

    session_id: str
    channel_id: str
    offset: int


@dataclass(frozen=True)
class OutputAcked:
    """The server consumed a command's or shell's output up to ``seq`` (flow control)."""

    session_id: str
    channel_id: str
    seq: int


@dataclass(frozen=True)
class StopChannel:
    """Kill the channel's process tree; it ends with ``reason``. ``wait``: before going on."""

    session_id: str
    channel_id: str
    reason: ExitReason
    wait: bool


@dataclass(frozen=True)
class ShellInput:
    session_id: str
    channel_id: str
    data: bytes


@dataclass(frozen=True)
class ResizeShell:
    session_id: str
    channel_id: str
    cols: int
    rows: int


@dataclass(frozen=True)
class EndSession:
    """End every running channel of ``session_id`` (``session_closed``) and wait for them."""

    session_id: str


Action = (
    StartCommand
    | StartShell
    | StartUpload
    | StartDownload
    | FileData
    | FileAcked
    | OutputAcked
    | StopChannel
    | ShellInput
    | ResizeShell
    | EndSession
)
ACTION_TYPES = (
    StartCommand,
    StartShell,
    StartUpload,
    StartDownload,
    FileData,
    FileAcked,
    OutputAcked,
    StopChannel,
    ShellInput,
    ResizeShell,
    EndSession,
)


class TransferDirection(StrEnum):
    UPLOAD = "upload"
    DOWNLOAD = "download"


_WINDOWS_BATCH_SUFFIXES = (".bat", ".cmd")


def check_command(frame: Terminal, *, windows: bool = sys.platform == "win32") -> None:
    """:class:`InvalidCommand` for a command no OS can run (NUL bytes, empty program), or a
    Windows batch file as ``argv[0]`` (CreateProcess runs it through ``cmd.exe``, which would
    interpret the other items: ``argv`` promises no shell). :class:`CwdNotAllowed` for a
    ``cwd`` that is not absolute or holds NUL (the allowlist is checked later, off-loop)."""
    if frame.argv is not None:
        if not frame.argv[0]:
            raise InvalidCommand("argv[0] must not be empty")
        if any("\x00" in item for item in frame.argv):
            raise InvalidCommand("argv must not contain NUL characters")
        # Windows ignores trailing dots and spaces in a file name: "x.bat." runs x.bat
        program = frame.argv[0].rstrip(". ").lower()
        if windows and program.endswith(_WINDOWS_BATCH_SUFFIXES):
            raise InvalidCommand("batch files (.bat, .cmd) cannot be run through argv on Windows")
    elif frame.command is not None:
        if not frame.command.strip():
            raise InvalidCommand("command must not be empty")
        if "\x00" in frame.command:
            raise InvalidCommand("command must not contain NUL characters")
    if frame.cwd is not None:
        if "\x00" in frame.cwd:
            raise CwdNotAllowed("the working directory must not contain NUL characters")
        if not (ntpath if windows else posixpath).isabs(frame.cwd):
            raise CwdNotAllowed("the working directory must be an absolute path")


_PROCESS_CHANNELS = frozenset({ChannelType.TERMINAL, ChannelType.SHELL})
"""Channels that run a process with numbered output (cancel, output acks)."""


class TunnelManager:
    """Mode, session and channels of one agent (the seed's Rust ``TunnelManager``)."""

    def __init__(
        self,
        *,
        max_channels: int = 16,
        shell_supported: bool = sys.platform != "win32",
    ) -> None:
        self._session_id: str | None = None
        self._tech_id: str | None = None
        self._channels: dict[str, ChannelType] = {}
        self._tokens: dict[str, int] = {}
        self._transfers: dict[str, TransferDirection] = {}
        """Direction of each open file-transfer channel."""
        self._last_token = 0
        self.max_channels = max_channels
        self.shell_supported = shell_supported

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
        self._tokens.clear()
        self._transfers.clear()

    def close_tunnel(self, session_id: str) -> None:
        """Leave tunnel mode; :class:`NoSuchSession` unless ``session_id`` is the open one."""
        self._require_session(session_id)
        self._drop()

    def add_channel(self, channel_id: str, channel_type: ChannelType) -> int:
        """Open a channel in the current session (exists / too many are refused); its token."""
        if self._session_id is None:
            raise NoSuchSession("no tunnel session is open")
        self._check_free(channel_id)
        return self._register(channel_id, channel_type)

    def _register(self, channel_id: str, channel_type: ChannelType) -> int:
        self._last_token += 1
        self._channels[channel_id] = channel_type
        self._tokens[channel_id] = self._last_token
        return self._last_token

    def release_channel(self, session_id: str, channel_id: str, token: int) -> bool:
        """Forget a finished channel if this very registration (``token``) is still open in
        ``session_id``; whether it was. A newer channel reusing the id is left alone."""
        if self._session_id != session_id or self._tokens.get(channel_id) != token:
            return False
        del self._channels[channel_id]
        del self._tokens[channel_id]
        self._transfers.pop(channel_id, None)
        return True

    def _check_free(self, channel_id: str) -> None:
        if channel_id in self._channels:
            raise ChannelExists(f"channel {channel_id} is already open")
        if len(self._channels) >= self.max_channels:
            raise TooManyChannels(f"at most {self.max_channels} channels may be open at once")

    def remove_channel(self, channel_id: str) -> None:
        """Close a channel of the current session (:class:`NoSuchChannel` if not open)."""
        if channel_id not in self._channels:
            raise NoSuchChannel(f"channel {channel_id} is not open")
        del self._channels[channel_id]
        del self._tokens[channel_id]
        self._transfers.pop(channel_id, None)

    def force_close(self) -> str | None:
        """Drop session and channels (the socket is gone); returns the dropped session id."""
        dropped = self._session_id
        self._drop()
        return dropped

    def _drop(self) -> None:
        self._session_id = None
        self._tech_id = None
        self._channels.clear()
        self._tokens.clear()
        self._transfers.clear()

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

    def handle(self, frame: ServerToAgent) -> list[AgentToServer | Action]:
        """What to send and do for ``frame``, in order (empty for connection-level frames)."""
        if isinstance(frame, Welcome | ErrorFrame | Reconnect):
            return []
        if isinstance(frame, FileChunk | FileAck | FileCancel):
            return self._transfer_frame(frame)
        if isinstance(frame, TerminalAck):
            return self._output_ack(frame)
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
        self,
        frame: TunnelOpen
        | TunnelClose
        | TunnelData
        | ChannelOpen
        | ChannelClose
        | Terminal
        | TerminalCancel
        | ShellOpen
        | ShellResize
        | FileUpload
        | FileDownload,
    ) -> list[AgentToServer | Action]:
        match frame:
            case TunnelOpen():
                self.open_tunnel(frame.session_id, frame.tech_id)
                return [TunnelReady(req_id=frame.req_id, session_id=frame.session_id)]
            case TunnelClose():
                self.close_tunnel(frame.session_id)
                return [
                    EndSession(frame.session_id),
                    TunnelClosed(
                        req_id=frame.req_id, session_id=frame.session_id, reason=frame.reason
                    ),
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
                self._require_channel(frame.session_id, frame.channel_id)
                self.remove_channel(frame.channel_id)
                return [
                    StopChannel(
                        frame.session_id, frame.channel_id, ExitReason.CANCELLED, wait=True
                    ),
                    ChannelClosed(
                        req_id=frame.req_id,
                        session_id=frame.session_id,
                        channel_id=frame.channel_id,
                    ),
                ]
            case Terminal():
                self._require_session(frame.session_id)
                self._check_free(frame.channel_id)
                check_command(frame)
                return [StartCommand(frame, self._register(frame.channel_id, ChannelType.TERMINAL))]
            case FileUpload() | FileDownload():
                self._require_session(frame.session_id)
                self._check_free(frame.channel_id)
                token = self._register(frame.channel_id, ChannelType.FILE)
                if isinstance(frame, FileUpload):
                    self._transfers[frame.channel_id] = TransferDirection.UPLOAD
                    return [StartUpload(frame, token)]
                self._transfers[frame.channel_id] = TransferDirection.DOWNLOAD
                return [StartDownload(frame, token)]
            case ShellOpen():
                self._require_session(frame.session_id)
                self._check_free(frame.channel_id)
                if not self.shell_supported:
                    raise NotImplementedYet("interactive shells are not supported on this OS")
                return [StartShell(frame, self._register(frame.channel_id, ChannelType.SHELL))]
            case TerminalCancel():
                self._require_running(frame.session_id, frame.channel_id, frame.type)
                return [
                    StopChannel(
                        frame.session_id, frame.channel_id, ExitReason.CANCELLED, wait=False
                    )
                ]
            case TunnelData():
                self._require_shell(frame.session_id, frame.channel_id, frame.type)
                return [ShellInput(frame.session_id, frame.channel_id, frame.data)]
            case ShellResize():
                self._require_shell(frame.session_id, frame.channel_id, frame.type)
                return [ResizeShell(frame.session_id, frame.channel_id, frame.cols, frame.rows)]

    def _transfer_frame(
        self, frame: FileChunk | FileAck | FileCancel
    ) -> list[AgentToServer | Action]:
        """A frame of a running transfer; dropped unless its channel is open and of its kind."""
        if frame.session_id != self._session_id:
            return []
        direction = self._transfers.get(frame.channel_id)
        match frame:
            case FileChunk() if direction is TransferDirection.UPLOAD:
                return [FileData(frame.session_id, frame.channel_id, frame)]
            case FileAck() if direction is TransferDirection.DOWNLOAD:
                return [FileAcked(frame.session_id, frame.channel_id, frame.offset)]
            case FileCancel() if direction is not None:
                return [
                    StopChannel(
                        frame.session_id, frame.channel_id, ExitReason.CANCELLED, wait=False
                    )
                ]
        return []

    def _output_ack(self, frame: TerminalAck) -> list[AgentToServer | Action]:
        """An ack of a running command's or shell's output; dropped otherwise (acks of a channel
        that just ended are expected, never an error)."""
        running = self._channels.get(frame.channel_id) in _PROCESS_CHANNELS
        if frame.session_id != self._session_id or not running:
            return []
        return [OutputAcked(frame.session_id, frame.channel_id, frame.seq)]

    def _require_running(self, session_id: str, channel_id: str, what: str) -> None:
        self._require_channel(session_id, channel_id)
        if self._channels[channel_id] not in _PROCESS_CHANNELS:
            raise NotImplementedYet(f"{what} is not supported on a {self._channels[channel_id]}")

    def _require_shell(self, session_id: str, channel_id: str, what: str) -> None:
        self._require_channel(session_id, channel_id)
        if self._channels[channel_id] is not ChannelType.SHELL:
            # commands read the null device; other channel types have no runtime yet
            raise NotImplementedYet(
                f"{what} is not supported on a {self._channels[channel_id]} channel"
            )
