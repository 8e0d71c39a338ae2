"""Terminal and shell channels: run a command with streamed output, or drive a PTY.

Contract:
- ``terminal.command`` runs one command on a new channel ``channel_id``: ``command`` through the
  agent's platform shell, or ``argv`` executed directly with no shell (exactly one of them). The
  agent answers the request with ``terminal.started`` (or ``tunnel.error``: ``cwd_not_allowed``,
  ``invalid_command``, ``too_many_channels``), then streams ``terminal.chunk`` frames as output is
  produced and always ends the channel with one ``terminal.exit``. Chunks and the exit frame of a
  channel are numbered ``seq`` 0, 1, 2, ... with no gaps, so a receiver can see loss.
- When the request says ``inline_result: true``, the answer may carry the channel's first
  frames: ``terminal.started.output`` (chunks ``seq`` 0, 1, ...) and, when the command already
  ended, ``terminal.started.exit`` (the next ``seq``). Streamed frames then continue the
  numbering; with ``exit`` set nothing follows. A short command is thus one request and one
  answer (an agent waits a few milliseconds before answering, ``inline_result_window_s``, for
  exactly this). Opt-in, because a receiver that does not know these fields would ignore them
  and lose the output: an older agent ignores the flag and streams, which every receiver reads.
- Output flow control, opt-in like ``inline_result``: ``terminal.command`` or ``shell.open``
  with ``window_bytes`` asks the agent to keep at most that much of the channel's output
  unacknowledged, and an agent that does so echoes ``window_bytes`` in its answer
  (``terminal.started`` or ``channel.opened``). A receiver acknowledges only an echoed window:
  an older agent ignores the field, streams unbounded, and is sent no ``terminal.ack`` it would
  not know. (Gateways are upgraded before the API: an older gateway refuses ``terminal.ack``.) Each
  ``terminal.chunk`` counts its data plus ``CHUNK_COST_BYTES`` (so small frames are bounded
  too), inline chunks included. The receiver sends ``terminal.ack{seq}`` (server -> agent, no
  answer) as it consumes output: every frame up to ``seq`` is consumed, or lost (a gap is
  acknowledged by any later ``seq``, so a lost frame never shrinks the window for good); acks
  are cumulative. The agent keeps each chunk's cost within a quarter of the window and the
  receiver acknowledges at least once per quarter of the window consumed, so an agent waiting
  for the window always gets an ack once the frames in flight arrive; and while output has
  stopped with everything consumed, the receiver acknowledges now and then past anything the
  agent can have sent, so frames or acks lost on the way never stop a channel for good. A chunk that
  would exceed the window waits (the agent stops reading the process's output, which then
  blocks on its next write); a chunk alone in flight never waits, nor does the exit frame.
  Once the channel is stopped (cancel, timeout, session close), or its process ended and the
  output did not drain within the agent's grace, the rest (what the pipes still hold) is sent
  without waiting. An ack for a channel that is not running changes nothing; one beyond what
  was sent frees everything sent and credits no later frame.
- ``terminal.cancel`` (server -> agent, no answer) kills the command's whole process tree; its
  exit frame then says ``cancelled``. A timeout does the same with ``timeout``; closing the
  session ends every channel with ``session_closed``.
- Output beyond the cap (the smaller of ``max_output_bytes`` and the agent's own cap) is dropped
  and the exit frame says ``truncated``; the command keeps running until it ends.
- ``shell.open`` starts an interactive PTY on channel ``channel_id`` (answered by
  ``channel.opened`` with ``channel_type: shell``). Input is ``tunnel.data`` to the agent, the
  size changes with ``shell.resize``; output is ``terminal.chunk`` (``stream: stdout``) and the
  end a ``terminal.exit``. ``channel.close`` kills the shell.
- ``TerminalOutput`` is the whole result of one command, the shape the API assembles from the
  stream for one-shot REST calls; agents do not send it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Self

from pydantic import Field, model_validator

from ..ids import Id
from .base import Frame, WireBytes

MAX_COMMAND_CHARS = 65536
MAX_ARGV_ITEMS = 1024
MAX_PATH_CHARS = 4096
MAX_INLINE_CHUNKS = 64
"""Chunks a ``terminal.started`` answer may carry (an agent sends more as a stream)."""
MIN_WINDOW_BYTES = 4096
MAX_WINDOW_BYTES = 64 * 1024 * 1024
CHUNK_COST_BYTES = 256
"""What one ``terminal.chunk`` counts against an output window beyond its data."""


def chunk_cost(data_bytes: int) -> int:
    """The window one ``terminal.chunk`` with ``data_bytes`` of data takes (module contract)."""
    return data_bytes + CHUNK_COST_BYTES


class OutputStream(StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"


class ExitReason(StrEnum):
    """Why a terminal or shell channel ended."""

    EXITED = "exited"
    """The process ended by itself; ``exit_code`` is set (negative: killed by that signal)."""
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    SPAWN_FAILED = "spawn_failed"
    """The process could not be started (``error`` says why)."""
    SESSION_CLOSED = "session_closed"


class Terminal(Frame):
    """server -> agent: run a command on the new terminal channel ``channel_id``."""

    type: Literal["terminal.command"] = "terminal.command"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    command: str | None = Field(default=None, max_length=MAX_COMMAND_CHARS)
    argv: list[str] | None = Field(default=None, min_length=1, max_length=MAX_ARGV_ITEMS)
    cwd: str | None = Field(default=None, max_length=MAX_PATH_CHARS)
    timeout_s: float = Field(default=300.0, gt=0, le=86400)
    max_output_bytes: int | None = Field(default=None, gt=0)
    inline_result: bool = False
    """The sender reads ``terminal.started.output``/``.exit`` (see the module contract)."""
    window_bytes: int | None = Field(default=None, ge=MIN_WINDOW_BYTES, le=MAX_WINDOW_BYTES)
    """Output flow control: the sender acknowledges output with ``terminal.ack``."""

    @model_validator(mode="after")
    def _one_of_command_or_argv(self) -> Self:
        if (self.command is None) == (self.argv is None):
            raise ValueError("exactly one of command or argv is required")
        return self


class TerminalChunk(Frame):
    """agent -> server: output of a terminal or shell channel, numbered per channel."""

    type: Literal["terminal.chunk"] = "terminal.chunk"
    session_id: Id
    channel_id: Id
    seq: int = Field(ge=0)
    stream: OutputStream
    data: WireBytes


class TerminalExit(Frame):
    """agent -> server: the last frame of a terminal or shell channel."""

    type: Literal["terminal.exit"] = "terminal.exit"
    session_id: Id
    channel_id: Id
    seq: int = Field(ge=0)
    reason: ExitReason
    exit_code: int | None = None
    truncated: bool = False
    duration_s: float = Field(ge=0)
    stdout_bytes: int = Field(ge=0)
    stderr_bytes: int = Field(ge=0)
    error: str | None = Field(default=None, max_length=1024)


class TerminalStarted(Frame):
    """agent -> server: answer to ``terminal.command``; the process runs or already ended.

    ``output`` and ``exit`` are the channel's first frames when the agent had them before it
    answered (see the module contract): same session and channel, ``seq`` from 0 without gaps.
    """

    type: Literal["terminal.started"] = "terminal.started"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    pid: int | None = None
    output: list[TerminalChunk] = Field(default_factory=list, max_length=MAX_INLINE_CHUNKS)
    exit: TerminalExit | None = None
    window_bytes: int | None = Field(default=None, ge=MIN_WINDOW_BYTES, le=MAX_WINDOW_BYTES)
    """The output window the agent applies (the request's): acknowledge output only when set."""

    def frames(self) -> list[TerminalChunk | TerminalExit]:
        """The channel's frames this answer carries, in ``seq`` order: its output, then its exit."""
        return [*self.output, *([self.exit] if self.exit is not None else [])]

    @model_validator(mode="after")
    def _inline_frames_continue_the_channel(self) -> Self:
        for seq, frame in enumerate(self.frames()):
            if frame.session_id != self.session_id or frame.channel_id != self.channel_id:
                raise ValueError("inline frames must belong to the answered channel")
            if frame.seq != seq:
                raise ValueError("inline frames must be numbered 0, 1, 2, ... without gaps")
        return self


class TerminalCancel(Frame):
    """server -> agent: kill the command of ``channel_id`` (no answer; its exit frame follows)."""

    type: Literal["terminal.cancel"] = "terminal.cancel"
    session_id: Id
    channel_id: Id


class TerminalAck(Frame):
    """server -> agent: the channel's frames up to ``seq`` are consumed (output flow control)."""

    type: Literal["terminal.ack"] = "terminal.ack"
    session_id: Id
    channel_id: Id
    seq: int = Field(ge=0)


class ShellOpen(Frame):
    """server -> agent: start an interactive PTY shell on channel ``channel_id``."""

    type: Literal["shell.open"] = "shell.open"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    cols: int = Field(default=80, ge=1, le=1000)
    rows: int = Field(default=24, ge=1, le=1000)
    window_bytes: int | None = Field(default=None, ge=MIN_WINDOW_BYTES, le=MAX_WINDOW_BYTES)
    """Output flow control, as for ``terminal.command``."""


class ShellResize(Frame):
    """server -> agent: the technician's terminal changed size."""

    type: Literal["shell.resize"] = "shell.resize"
    session_id: Id
    channel_id: Id
    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


class TerminalOutput(Frame):
    """The whole result of one command (assembled by the API; not sent by agents)."""

    type: Literal["terminal.output"] = "terminal.output"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    stdout: str
    stderr: str
    exit_code: int | None
