"""Integration tests of the channel runtimes' hardening: environment, exit detection, fds,
shell input isolation, one exit frame under failures, controlling terminal, held cwd.

Real agent, real processes, real PTYs, real WebSocket (the fake gateway); failures are
injected with monkeypatch on the agent's own methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from gurutunnel_agent.channels.output import ChannelOutput
from gurutunnel_agent.channels.terminal import CommandChannel, CommandLimits, open_cwd
from gurutunnel_agent.client import AgentClient
from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages import (
    AgentToServer,
    ChannelOpened,
    ExitReason,
    ShellOpen,
    Terminal,
    TerminalChunk,
    TerminalExit,
    TerminalStarted,
    TunnelClose,
    TunnelClosed,
    TunnelData,
    TunnelError,
)
from tests.integration.agent.tunnel_harness import SESSION, Tunnel, wait_pids_gone

OpenTunnel = Callable[..., Awaitable[Tunnel]]
SECRET = "gt-secret-credential-value-42"

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and PTYs")


def cmd(channel_id: str, command: str | None = None, **fields: object) -> Terminal:
    values: dict[str, object] = {"req_id": f"r-{channel_id}", "session_id": SESSION}
    if command is not None:
        values["command"] = command
    return Terminal.model_validate({"channel_id": channel_id, **values, **fields})


@pytest.fixture
def orphans() -> Iterator[list[int]]:
    """Pids of processes a test started that outlive their channel; SIGKILLed at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def shell(open_tunnel: OpenTunnel, monkeypatch: pytest.MonkeyPatch) -> Tunnel:
    """A session with an open /bin/sh on channel sh; the agent's env holds a credential."""
    monkeypatch.setenv("SHELL", "/bin/sh")
    monkeypatch.setenv("GT_AGENT_CREDENTIAL", SECRET)
    tunnel = await open_tunnel()
    await tunnel.send(ShellOpen(req_id="r-sh", session_id=SESSION, channel_id="sh"))
    assert isinstance(await tunnel.next_for("sh"), ChannelOpened)
    return tunnel


async def type_line(tunnel: Tunnel, line: str) -> None:
    await tunnel.send(TunnelData(session_id=SESSION, channel_id="sh", data=line.encode()))


# -- 1: environment -------------------------------------------------------------------------


@posix_only
async def test_commands_do_not_see_the_agent_credential(
    open_tunnel: OpenTunnel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """argv /usr/bin/env prints the environment without any GT_AGENT_* variable."""
    monkeypatch.setenv("GT_AGENT_CREDENTIAL", SECRET)
    monkeypatch.setenv("gt_agent_log_level", "INFO")  # settings match names case-insensitively
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", argv=["/usr/bin/env"]))
    result = await tunnel.collect("c1")
    output = result.output()
    assert b"PATH=" in output  # the rest of the environment is passed on
    assert SECRET.encode() not in output
    assert b"gt_agent_" not in output.lower()


@posix_only
async def test_shells_do_not_see_the_agent_credential(shell: Tunnel) -> None:
    """`echo $GT_AGENT_CREDENTIAL` in a shell prints nothing."""
    await type_line(shell, 'echo "cred=[$GT_AGENT_CREDENTIAL]-end"\n')
    seen, _ = await shell.output_until("sh", b"cred=[]-end")
    assert SECRET.encode() not in seen


# -- 2 and 4: exit detection and transport cleanup ------------------------------------------


@posix_only
async def test_command_exiting_while_a_child_holds_its_pipes_ends_exited_promptly(
    open_tunnel: OpenTunnel,
) -> None:
    """The shell exits while a background sleep holds its pipes: exit `exited` within the
    drain grace (not `timeout` after timeout_s), and the sleep is killed with the group."""
    tunnel = await open_tunnel(kill_grace_s=0.5)
    loop = asyncio.get_running_loop()
    await tunnel.send(cmd("c1", "sleep 0.3; sleep 30 & echo started-$!", timeout_s=4))
    started = await tunnel.next_for("c1")
    assert isinstance(started, TerminalStarted)
    began = loop.time()
    result = await tunnel.collect("c1")
    elapsed = loop.time() - began
    assert result.exit is not None
    assert (result.exit.reason, result.exit.exit_code) == (ExitReason.EXITED, 0)
    assert elapsed < 0.3 + 0.5 + 1.0
    background = int(result.output().split(b"started-")[1])
    assert await wait_pids_gone([background]) == []


@posix_only
async def test_commands_whose_orphan_keeps_the_pipes_do_not_leak_fds(
    open_tunnel: OpenTunnel, orphans: list[int]
) -> None:
    """Orphans that left the group keep the pipes open; the agent still closes its ends."""
    tunnel = await open_tunnel(kill_grace_s=0.2)
    me = psutil.Process()
    await tunnel.send(cmd("warm", "true"))
    assert (await tunnel.collect("warm")).exit is not None
    before = me.num_fds()
    channels = [f"c{n}" for n in range(4)]
    for channel in channels:
        await tunnel.send(cmd(channel, "setsid sleep 30 & echo $!"))
    for channel in channels:
        result = await tunnel.collect(channel)
        assert result.exit is not None and result.exit.reason is ExitReason.EXITED
        orphans.append(int(result.output()))
    assert me.num_fds() - before <= 3  # 2 per command leaked before


# -- 5: shell input does not block the reader -----------------------------------------------


@posix_only
async def test_stuck_shell_input_does_not_delay_other_channels(shell: Tunnel) -> None:
    """A shell that reads no input is fed megabytes; a command on another channel is still
    answered promptly, and the overflow is refused agent_backpressure on the shell."""
    await type_line(shell, 'stty raw -echo; echo ready-"x"; sleep 30\n')
    await shell.output_until("sh", b"ready-x")
    piece = b"y" * 64 * 1024
    for _ in range(24):  # 1.5 MiB: more than the PTY and the 1 MiB input queue hold
        await shell.send(TunnelData(session_id=SESSION, channel_id="sh", data=piece))
    loop = asyncio.get_running_loop()
    began = loop.time()
    await shell.send(cmd("c2", "echo hi"))
    result = await shell.collect("c2", timeout_s=5)
    assert loop.time() - began < 2.0
    assert result.output() == b"hi\n"
    refused = [f for f in shell.stash.get("sh", []) if isinstance(f, TunnelError)]
    assert refused and all(f.code is ErrorCode.AGENT_BACKPRESSURE for f in refused)


# -- 6: exactly one exit frame under failures -----------------------------------------------


@posix_only
async def test_supervisor_failure_kills_the_tree_and_still_sends_the_exit(
    open_tunnel: OpenTunnel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in the supervisor: the process is killed and one exit frame says why."""

    async def broken(self: CommandChannel, spawned: object) -> ExitReason | None:
        raise RuntimeError("injected supervisor bug")

    monkeypatch.setattr(CommandChannel, "_supervise", broken)
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", argv=["sleep", "30"]))
    result = await tunnel.collect("c1", timeout_s=3)
    assert isinstance(result.answer, TerminalStarted) and result.answer.pid is not None
    assert result.exit is not None
    assert result.exit.error is not None and "supervising" in result.exit.error
    assert await wait_pids_gone([result.answer.pid]) == []


@posix_only
@pytest.mark.parametrize("inline_result", [False, True], ids=["streamed", "inline"])
async def test_failed_started_answer_still_lets_the_channel_end(
    open_tunnel: OpenTunnel, monkeypatch: pytest.MonkeyPatch, inline_result: bool
) -> None:
    """Sending terminal.started raises (not ConnectionClosed): output and exit still flow, also
    when they were held for the answer (then sent on their own)."""
    original = AgentClient._send

    async def flaky(self: AgentClient, conn: object, frame: AgentToServer) -> None:
        if isinstance(frame, TerminalStarted):
            raise RuntimeError("injected send failure")
        await original(self, conn, frame)  # type: ignore[arg-type]

    monkeypatch.setattr(AgentClient, "_send", flaky)
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", "echo hi", inline_result=inline_result))
    result = await tunnel.collect("c1", timeout_s=3)
    assert result.answer is None
    assert result.output() == b"hi\n"
    assert result.exit is not None and result.exit.reason is ExitReason.EXITED


@posix_only
async def test_channel_stuck_at_close_still_gets_its_exit_before_closed(
    open_tunnel: OpenTunnel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A channel that ignores the stop is cancelled at the bound; its exit (session_closed) is
    sent for it before tunnel.closed, and its process is gone."""
    monkeypatch.setattr(CommandChannel, "request_stop", lambda self, reason: None)
    monkeypatch.setattr(AgentClient, "_channel_end_bound_s", lambda self: 0.3)
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", argv=["sleep", "30"]))
    started = await tunnel.next_for("c1")
    assert isinstance(started, TerminalStarted) and started.pid is not None
    await tunnel.send(TunnelClose(req_id="close", session_id=SESSION))
    end = await tunnel.next_for("c1", timeout_s=5)
    assert isinstance(end, TerminalExit) and end.reason is ExitReason.SESSION_CLOSED
    closed = await tunnel.next_for("")
    assert isinstance(closed, TunnelClosed)
    assert tunnel.order.index(end) < tunnel.order.index(closed)
    assert await wait_pids_gone([started.pid]) == []


# -- 9: the PTY is the controlling terminal -------------------------------------------------


@posix_only
async def test_shell_has_the_pty_as_controlling_terminal_and_job_control(shell: Tunnel) -> None:
    """`tty` names a /dev/pts device, ps shows it as the shell's terminal, `jobs` lists a job."""
    await type_line(shell, 'echo "tty=$(tty)" "ctty=$(ps -o tty= -p $$)" "-end"\n')
    seen, _ = await shell.output_until("sh", b"-end\r\n")
    line = seen[seen.rindex(b"tty=/") :]
    assert line.startswith(b"tty=/dev/pts/")
    assert b"ctty=pts/" in line
    await type_line(shell, "sleep 30 &\n")
    await type_line(shell, 'jobs; echo "jobs-""done"\n')
    seen, _ = await shell.output_until("sh", b"jobs-done")
    assert b"Running" in seen and b"sleep 30" in seen


# -- 3: the working directory is held, not looked up again ----------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
async def test_directory_swapped_for_a_symlink_before_spawn_runs_nothing_outside(
    tmp_path: Path,
) -> None:
    """Checked and opened, then swapped for a symlink out of the allowlist before the spawn:
    the command runs in the checked directory, nothing is created outside."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "work").mkdir(parents=True)
    outside.mkdir()
    workdir = open_cwd(str(allowed / "work"), [allowed])
    (allowed / "work").rename(allowed / "work-old")  # the hook: swap between check and spawn
    (allowed / "work").symlink_to(outside, target_is_directory=True)
    frames: list[AgentToServer] = []

    async def emit(frame: AgentToServer) -> None:
        frames.append(frame)

    frame = Terminal(session_id=SESSION, channel_id="c1", command="touch marker; pwd -P")
    channel = CommandChannel(
        frame,
        cwd=workdir,
        limits=CommandLimits(chunk_bytes=4096, max_output_bytes=4096, kill_grace_s=0.5),
        emit=emit,
    )
    assert await channel.start() is not None
    assert workdir.fd is None  # closed once the child had it
    channel.output.open()
    async with asyncio.timeout(5):
        await channel.run()
    out = b"".join(f.data for f in frames if isinstance(f, TerminalChunk))
    assert out == f"{(allowed / 'work-old').resolve()}\n".encode()
    assert not (outside / "marker").exists()
    assert (allowed / "work-old" / "marker").exists()
    assert isinstance(channel.output, ChannelOutput) and channel.output.exited
