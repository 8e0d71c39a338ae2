"""Unit tests of the agent's sans-I/O tunnel state machine (no sockets)."""

from __future__ import annotations

import pytest

from gurutunnel_agent.tunnel import (
    ChannelExists,
    EndSession,
    InvalidCommand,
    NoSuchChannel,
    NoSuchSession,
    ResizeShell,
    ShellInput,
    StartCommand,
    StartShell,
    StopChannel,
    TooManyChannels,
    TunnelBusy,
    TunnelManager,
    TunnelMode,
    check_command,
)
from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages import (
    ChannelClose,
    ChannelClosed,
    ChannelOpen,
    ChannelOpened,
    ChannelType,
    ErrorFrame,
    ExitReason,
    Reconnect,
    ShellOpen,
    ShellResize,
    Terminal,
    TerminalCancel,
    TunnelClose,
    TunnelClosed,
    TunnelData,
    TunnelError,
    TunnelOpen,
    TunnelReady,
    Welcome,
)


def mode(tunnel: TunnelManager) -> TunnelMode:
    # a call, not an attribute, so mypy does not narrow the mode across state changes
    return tunnel.mode


@pytest.fixture
def tunnel() -> TunnelManager:
    return TunnelManager(max_channels=3, shell_supported=True)


@pytest.fixture
def open_tunnel(tunnel: TunnelManager) -> TunnelManager:
    tunnel.open_tunnel("s1", "tech1")
    return tunnel


def test_tunnel_lifecycle(tunnel: TunnelManager) -> None:
    """Open enters tunnel mode, a mismatched close is refused, the right close returns."""
    assert mode(tunnel) is TunnelMode.HEARTBEAT
    tunnel.open_tunnel("s1", "tech1")
    assert mode(tunnel) is TunnelMode.TUNNEL
    assert (tunnel.session_id, tunnel.tech_id) == ("s1", "tech1")
    with pytest.raises(NoSuchSession):
        tunnel.close_tunnel("other")
    assert mode(tunnel) is TunnelMode.TUNNEL
    tunnel.close_tunnel("s1")
    assert mode(tunnel) is TunnelMode.HEARTBEAT
    assert tunnel.session_id is None


def test_second_concurrent_session_is_refused_busy(open_tunnel: TunnelManager) -> None:
    """A second session while one is open raises TunnelBusy (code tunnel_busy)."""
    with pytest.raises(TunnelBusy) as info:
        open_tunnel.open_tunnel("s2", "tech2")
    assert info.value.code is ErrorCode.TUNNEL_BUSY
    assert open_tunnel.session_id == "s1"


def test_reopening_the_same_session_is_idempotent(open_tunnel: TunnelManager) -> None:
    """A re-delivered open of the held session keeps it and its channels."""
    open_tunnel.add_channel("c1", ChannelType.TERMINAL)
    open_tunnel.open_tunnel("s1", "tech1")
    assert open_tunnel.session_id == "s1"
    assert open_tunnel.channels == {"c1": ChannelType.TERMINAL}
    with pytest.raises(TunnelBusy):
        open_tunnel.open_tunnel("s1", "another-tech")


def test_close_without_session_is_refused(tunnel: TunnelManager) -> None:
    """Closing in heartbeat mode raises NoSuchSession (code no_such_session)."""
    with pytest.raises(NoSuchSession) as info:
        tunnel.close_tunnel("s1")
    assert info.value.code is ErrorCode.NO_SUCH_SESSION


def test_channel_management(open_tunnel: TunnelManager) -> None:
    """Add, duplicate refused, remove, unknown refused, channels dropped on close."""
    open_tunnel.add_channel("c1", ChannelType.TERMINAL)
    open_tunnel.add_channel("c2", ChannelType.FILE)
    with pytest.raises(ChannelExists) as exists:
        open_tunnel.add_channel("c1", ChannelType.FILE)
    assert exists.value.code is ErrorCode.CHANNEL_EXISTS
    assert open_tunnel.channels == {"c1": ChannelType.TERMINAL, "c2": ChannelType.FILE}
    open_tunnel.remove_channel("c1")
    with pytest.raises(NoSuchChannel) as missing:
        open_tunnel.remove_channel("c1")
    assert missing.value.code is ErrorCode.NO_SUCH_CHANNEL
    open_tunnel.close_tunnel("s1")
    assert open_tunnel.channels == {}
    open_tunnel.open_tunnel("s2", "tech1")
    assert open_tunnel.channels == {}


def test_channel_outside_tunnel_is_refused(tunnel: TunnelManager) -> None:
    """Channels exist only inside a tunnel: adding one in heartbeat mode is no_such_session."""
    with pytest.raises(NoSuchSession):
        tunnel.add_channel("c1", ChannelType.TERMINAL)
    assert tunnel.channels == {}


def test_force_close_drops_session_and_channels(open_tunnel: TunnelManager) -> None:
    """force_close returns the dropped session id and goes back to heartbeat mode."""
    open_tunnel.add_channel("c1", ChannelType.TERMINAL)
    assert open_tunnel.force_close() == "s1"
    assert mode(open_tunnel) is TunnelMode.HEARTBEAT
    assert open_tunnel.channels == {}
    assert open_tunnel.force_close() is None
    open_tunnel.open_tunnel("s2", "tech2")
    assert open_tunnel.session_id == "s2"


# -- handle(): one answer per server frame -------------------------------------------------


def test_handle_open_answers_ready_with_same_req_id(tunnel: TunnelManager) -> None:
    """tunnel.open -> tunnel.ready echoing req_id and session_id."""
    answers = tunnel.handle(TunnelOpen(req_id="r1", session_id="s1", tech_id="t1"))
    assert answers == [TunnelReady(req_id="r1", session_id="s1")]
    assert mode(tunnel) is TunnelMode.TUNNEL


def test_handle_second_open_answers_tunnel_busy(open_tunnel: TunnelManager) -> None:
    """tunnel.open while busy -> tunnel.error{tunnel_busy} with the request's req_id."""
    [answer] = open_tunnel.handle(TunnelOpen(req_id="r2", session_id="s2", tech_id="t2"))
    assert isinstance(answer, TunnelError)
    assert (answer.code, answer.req_id, answer.session_id) == (ErrorCode.TUNNEL_BUSY, "r2", "s2")
    assert answer.held_session_id == "s1"
    assert open_tunnel.session_id == "s1"


def test_other_refusals_name_no_held_session(open_tunnel: TunnelManager) -> None:
    """Only tunnel_busy names the held session; other errors leave held_session_id empty."""
    [answer] = open_tunnel.handle(TunnelClose(req_id="r3", session_id="other"))
    assert isinstance(answer, TunnelError)
    assert answer.code == ErrorCode.NO_SUCH_SESSION
    assert answer.held_session_id is None


def test_handle_close_ends_channels_then_answers_closed(open_tunnel: TunnelManager) -> None:
    """tunnel.close -> end the session's channels, then tunnel.closed; back to heartbeat mode."""
    answers = open_tunnel.handle(TunnelClose(req_id="r3", session_id="s1", reason="idle_timeout"))
    assert answers == [
        EndSession("s1"),
        TunnelClosed(req_id="r3", session_id="s1", reason="idle_timeout"),
    ]
    assert mode(open_tunnel) is TunnelMode.HEARTBEAT


def test_handle_close_of_other_session_answers_no_such_session(
    open_tunnel: TunnelManager,
) -> None:
    """tunnel.close naming another session -> tunnel.error{no_such_session}, still open."""
    [answer] = open_tunnel.handle(TunnelClose(req_id="r4", session_id="zz"))
    assert isinstance(answer, TunnelError)
    assert (answer.code, answer.req_id) == (ErrorCode.NO_SUCH_SESSION, "r4")
    assert open_tunnel.session_id == "s1"


def test_handle_channel_open_and_close_answer_opened_and_closed(
    open_tunnel: TunnelManager,
) -> None:
    """channel.open -> channel.opened; channel.close -> channel.closed; ids echoed."""
    opened = open_tunnel.handle(
        ChannelOpen(req_id="r5", session_id="s1", channel_id="c1", channel_type="terminal")
    )
    assert opened == [
        ChannelOpened(req_id="r5", session_id="s1", channel_id="c1", channel_type="terminal")
    ]
    closed = open_tunnel.handle(ChannelClose(req_id="r6", session_id="s1", channel_id="c1"))
    assert closed == [
        StopChannel("s1", "c1", ExitReason.CANCELLED, wait=True),
        ChannelClosed(req_id="r6", session_id="s1", channel_id="c1"),
    ]
    assert open_tunnel.channels == {}


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (
            ChannelOpen(req_id="r", session_id="s1", channel_id="c1", channel_type="file"),
            ErrorCode.CHANNEL_EXISTS,
        ),
        (
            ChannelOpen(req_id="r", session_id="other", channel_id="c9", channel_type="file"),
            ErrorCode.NO_SUCH_SESSION,
        ),
        (ChannelClose(req_id="r", session_id="s1", channel_id="c9"), ErrorCode.NO_SUCH_CHANNEL),
        (ChannelClose(req_id="r", session_id="other", channel_id="c1"), ErrorCode.NO_SUCH_SESSION),
        (
            Terminal(req_id="r", session_id="s1", channel_id="c1", command="ls"),
            ErrorCode.CHANNEL_EXISTS,
        ),
        (TunnelData(session_id="s1", channel_id="c1", data=b"x"), ErrorCode.NOT_IMPLEMENTED),
        (
            Terminal(req_id="r", session_id="other", channel_id="c9", command="ls"),
            ErrorCode.NO_SUCH_SESSION,
        ),
        (TunnelData(session_id="other", channel_id="c1", data=b"x"), ErrorCode.NO_SUCH_SESSION),
        (TerminalCancel(session_id="s1", channel_id="c9"), ErrorCode.NO_SUCH_CHANNEL),
        (
            ShellResize(session_id="s1", channel_id="c1", cols=80, rows=24),
            ErrorCode.NOT_IMPLEMENTED,
        ),
        (
            Terminal(req_id="r", session_id="s1", channel_id="c9", command="ls", cwd="rel/dir"),
            ErrorCode.CWD_NOT_ALLOWED,
        ),
        (
            Terminal(req_id="r", session_id="s1", channel_id="c9", argv=["ls", "a\x00b"]),
            ErrorCode.INVALID_COMMAND,
        ),
        (
            Terminal(req_id="r", session_id="s1", channel_id="c9", command="   "),
            ErrorCode.INVALID_COMMAND,
        ),
    ],
    ids=[
        "duplicate-channel",
        "channel-open-other-session",
        "unknown-channel-close",
        "channel-close-other-session",
        "terminal-command-on-open-channel",
        "input-to-a-command",
        "terminal-other-session",
        "data-other-session",
        "cancel-unknown-channel",
        "resize-not-a-shell",
        "cwd-not-absolute",
        "nul-in-argv",
        "blank-command",
    ],
)
def test_handle_refusals_answer_tunnel_error_with_code(
    open_tunnel: TunnelManager,
    frame: ChannelOpen | ChannelClose | Terminal | TunnelData | TerminalCancel | ShellResize,
    code: ErrorCode,
) -> None:
    """Each refused request is answered by exactly one tunnel.error with the documented code."""
    open_tunnel.add_channel("c1", ChannelType.TERMINAL)
    [answer] = open_tunnel.handle(frame)
    assert isinstance(answer, TunnelError)
    assert answer.code is code
    assert answer.session_id == frame.session_id
    assert answer.channel_id == frame.channel_id
    assert answer.req_id == getattr(frame, "req_id", None)
    assert open_tunnel.session_id == "s1"
    assert open_tunnel.channels == {"c1": ChannelType.TERMINAL}


def test_handle_channel_frames_in_heartbeat_mode_answer_no_such_session(
    tunnel: TunnelManager,
) -> None:
    """channel.open without a tunnel -> tunnel.error{no_such_session}."""
    [answer] = tunnel.handle(
        ChannelOpen(req_id="r", session_id="s1", channel_id="c1", channel_type="terminal")
    )
    assert isinstance(answer, TunnelError)
    assert answer.code is ErrorCode.NO_SUCH_SESSION


@pytest.mark.parametrize(
    "frame",
    [
        Welcome(agent_id="a", conn_id="c", gateway_id="g", heartbeat_interval_s=1),
        ErrorFrame(code=ErrorCode.MALFORMED_FRAME, message="bad"),
        Reconnect(delay_ms=10),
    ],
    ids=["welcome", "error", "reconnect"],
)
def test_handle_connection_level_frames_answer_nothing(
    open_tunnel: TunnelManager, frame: Welcome | ErrorFrame | Reconnect
) -> None:
    """welcome, error and reconnect are the client's business: no answer, no state change."""
    assert open_tunnel.handle(frame) == []
    assert open_tunnel.session_id == "s1"


# -- channels that run something ---------------------------------------------------------


def test_terminal_command_registers_channel_and_asks_to_start(open_tunnel: TunnelManager) -> None:
    """terminal.command -> StartCommand with a registration token; the channel is taken."""
    frame = Terminal(req_id="r", session_id="s1", channel_id="c1", command="ls", cwd="/etc")
    [start] = open_tunnel.handle(frame)
    assert isinstance(start, StartCommand)
    assert start.frame is frame
    assert open_tunnel.channels == {"c1": ChannelType.TERMINAL}


def test_refused_command_takes_no_channel(open_tunnel: TunnelManager) -> None:
    """A command refused for its cwd leaves no channel behind (nothing runs)."""
    [answer] = open_tunnel.handle(
        Terminal(req_id="r", session_id="s1", channel_id="c1", command="ls", cwd="etc")
    )
    assert isinstance(answer, TunnelError)
    assert answer.code is ErrorCode.CWD_NOT_ALLOWED
    assert open_tunnel.channels == {}


def test_channel_limit_answers_too_many_channels(open_tunnel: TunnelManager) -> None:
    """Past max_channels a new command is too_many_channels; a released id frees a slot."""
    starts = [
        open_tunnel.handle(Terminal(session_id="s1", channel_id=f"c{n}", command="true"))[0]
        for n in range(3)
    ]
    assert isinstance(starts[0], StartCommand)
    [answer] = open_tunnel.handle(
        Terminal(req_id="r", session_id="s1", channel_id="c3", command="x")
    )
    assert isinstance(answer, TunnelError)
    assert (answer.code, answer.req_id) == (ErrorCode.TOO_MANY_CHANNELS, "r")
    with pytest.raises(TooManyChannels):
        open_tunnel.add_channel("c4", ChannelType.FILE)
    assert open_tunnel.release_channel("s1", "c0", starts[0].token) is True
    assert open_tunnel.release_channel("s1", "c0", starts[0].token) is False
    [start] = open_tunnel.handle(Terminal(session_id="s1", channel_id="c0", command="true"))
    assert isinstance(start, StartCommand)


def test_release_of_a_closed_session_is_a_no_op(open_tunnel: TunnelManager) -> None:
    """A channel finishing after its session closed does not touch the next session."""
    [start] = open_tunnel.handle(Terminal(session_id="s1", channel_id="c1", command="true"))
    assert isinstance(start, StartCommand)
    open_tunnel.close_tunnel("s1")
    open_tunnel.open_tunnel("s2", "tech1")
    open_tunnel.add_channel("c1", ChannelType.TERMINAL)
    assert open_tunnel.release_channel("s1", "c1", start.token) is False
    assert open_tunnel.channels == {"c1": ChannelType.TERMINAL}


def test_late_release_of_an_old_channel_keeps_a_newer_one_with_the_same_id(
    open_tunnel: TunnelManager,
) -> None:
    """channel.close frees c1, a new c1 starts; the old one's late release leaves the new one."""
    [old] = open_tunnel.handle(Terminal(session_id="s1", channel_id="c1", command="sleep 9"))
    assert isinstance(old, StartCommand)
    open_tunnel.handle(ChannelClose(req_id="r", session_id="s1", channel_id="c1"))
    [new] = open_tunnel.handle(Terminal(session_id="s1", channel_id="c1", command="true"))
    assert isinstance(new, StartCommand)
    assert open_tunnel.release_channel("s1", "c1", old.token) is False
    assert open_tunnel.channels == {"c1": ChannelType.TERMINAL}
    assert open_tunnel.release_channel("s1", "c1", new.token) is True
    assert open_tunnel.channels == {}


@pytest.mark.parametrize("program", ["run.bat", "C:\\tools\\RUN.CMD", "x.bat. ", "y.cmd."])
def test_batch_file_as_argv0_is_invalid_command_on_windows(program: str) -> None:
    """On Windows a .bat/.cmd argv[0] is refused invalid_command (cmd.exe would parse argv)."""
    frame = Terminal(session_id="s1", channel_id="c1", argv=[program, "a&calc"])
    with pytest.raises(InvalidCommand) as info:
        check_command(frame, windows=True)
    assert info.value.code is ErrorCode.INVALID_COMMAND
    check_command(frame, windows=False)  # elsewhere it is just a file name
    check_command(Terminal(session_id="s1", channel_id="c1", argv=["run.exe"]), windows=True)


def test_shell_frames_become_actions(open_tunnel: TunnelManager) -> None:
    """shell.open -> StartShell; tunnel.data -> ShellInput; resize; cancel -> StopChannel."""
    frame = ShellOpen(req_id="r", session_id="s1", channel_id="sh", cols=100, rows=30)
    [start] = open_tunnel.handle(frame)
    assert isinstance(start, StartShell) and start.frame is frame
    assert open_tunnel.handle(TunnelData(session_id="s1", channel_id="sh", data=b"ls\n")) == [
        ShellInput("s1", "sh", b"ls\n")
    ]
    assert open_tunnel.handle(ShellResize(session_id="s1", channel_id="sh", cols=1, rows=2)) == [
        ResizeShell("s1", "sh", 1, 2)
    ]
    assert open_tunnel.handle(TerminalCancel(session_id="s1", channel_id="sh")) == [
        StopChannel("s1", "sh", ExitReason.CANCELLED, wait=False)
    ]


def test_shell_where_unsupported_answers_not_implemented() -> None:
    """shell.open on an OS without PTY support -> not_implemented, no channel."""
    tunnel = TunnelManager(shell_supported=False)
    tunnel.open_tunnel("s1", "t1")
    [answer] = tunnel.handle(ShellOpen(req_id="r", session_id="s1", channel_id="sh"))
    assert isinstance(answer, TunnelError)
    assert answer.code is ErrorCode.NOT_IMPLEMENTED
    assert tunnel.channels == {}
