"""Integration tests of the PTY shell channel: real agent, real /bin/sh on a real PTY."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

import pytest

from gurutunnel_protocol.messages import (
    ChannelClose,
    ChannelClosed,
    ChannelOpened,
    ChannelType,
    ExitReason,
    OutputStream,
    ShellOpen,
    ShellResize,
    TerminalChunk,
    TerminalExit,
    TunnelClose,
    TunnelClosed,
    TunnelData,
)
from tests.integration.agent.tunnel_harness import SESSION, Tunnel, wait_pids_gone

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="PTY shells are POSIX only")

OpenTunnel = Callable[..., Awaitable[Tunnel]]


@pytest.fixture
async def shell(open_tunnel: OpenTunnel, monkeypatch: pytest.MonkeyPatch) -> Tunnel:
    """A session with an open /bin/sh shell on channel sh (80x24)."""
    monkeypatch.setenv("SHELL", "/bin/sh")  # no user rc files: predictable output
    tunnel = await open_tunnel()
    await tunnel.send(ShellOpen(req_id="r-sh", session_id=SESSION, channel_id="sh"))
    opened = await tunnel.next_for("sh")
    assert isinstance(opened, ChannelOpened)
    assert (opened.req_id, opened.channel_type) == ("r-sh", ChannelType.SHELL)
    return tunnel


async def type_line(tunnel: Tunnel, line: str) -> None:
    await tunnel.send(TunnelData(session_id=SESSION, channel_id="sh", data=line.encode()))


async def test_stty_size_after_resize_prints_the_new_size(shell: Tunnel) -> None:
    """The initial size is the open's; after shell.resize, `stty size` reports the new one."""
    await type_line(shell, "echo initial-$(stty size | tr ' ' x)\n")
    await shell.output_until("sh", b"initial-24x80")
    await shell.send(ShellResize(session_id=SESSION, channel_id="sh", cols=132, rows=43))
    await type_line(shell, "echo resized-$(stty size | tr ' ' x)\n")
    await shell.output_until("sh", b"resized-43x132")


async def test_typed_input_is_echoed_and_run(shell: Tunnel) -> None:
    """Keystrokes come back as the terminal's echo, then the command's output."""
    await type_line(shell, "echo typed-$((40 + 2))\n")
    seen, frames = await shell.output_until("sh", b"typed-42\r\n")
    assert b"echo typed-$((40 + 2))" in seen  # the PTY echoed what was typed
    assert all(isinstance(f, TerminalChunk) and f.stream is OutputStream.STDOUT for f in frames)


async def test_exit_ends_the_channel_with_its_exit_code(shell: Tunnel) -> None:
    """`exit 3` ends the channel with terminal.exit{exited, 3}; chunks were numbered from 0."""
    await type_line(shell, "exit 3\n")
    result = await shell.collect("sh")
    assert result.exit is not None
    assert (result.exit.reason, result.exit.exit_code) == (ExitReason.EXITED, 3)
    assert result.chunks and result.chunks[0].seq == 0
    assert result.exit.seq == result.chunks[-1].seq + 1
    assert shell.agent.client.tunnel.channels == {}


async def test_channel_close_kills_the_shell_and_its_jobs(shell: Tunnel) -> None:
    """channel.close: the shell and a background job die, exit says cancelled, then closed."""
    # quoted in the input, so the echoed keystrokes do not match the marker; only the output
    await type_line(shell, 'sleep 60 & echo pids-$$-$!-"end"\n')
    seen, _ = await shell.output_until("sh", b"-end\r\n")
    marker = seen[seen.rindex(b"pids-") :]
    shell_pid, job_pid = (int(x) for x in marker.split(b"-")[1:3])
    await shell.send(ChannelClose(req_id="r-close", session_id=SESSION, channel_id="sh"))
    end = await shell.next_for("sh")
    while isinstance(end, TerminalChunk):
        end = await shell.next_for("sh")
    assert isinstance(end, TerminalExit) and end.reason is ExitReason.CANCELLED
    closed = await shell.next_for("sh")
    assert isinstance(closed, ChannelClosed) and closed.req_id == "r-close"
    assert await wait_pids_gone([shell_pid, job_pid]) == []


async def test_tunnel_close_kills_the_shell_and_its_jobs(shell: Tunnel) -> None:
    """tunnel.close: the shell and a background job die; the shell's exit says session_closed
    and comes before tunnel.closed."""
    # quoted in the input, so the echoed keystrokes do not match the marker; only the output
    await type_line(shell, 'sleep 300 & echo pids-$$-$!-"end"\n')
    seen, _ = await shell.output_until("sh", b"-end\r\n")
    marker = seen[seen.rindex(b"pids-") :]
    shell_pid, job_pid = (int(x) for x in marker.split(b"-")[1:3])
    await shell.send(TunnelClose(req_id="r-tclose", session_id=SESSION))
    end = await shell.next_for("sh")
    while isinstance(end, TerminalChunk):
        end = await shell.next_for("sh")
    assert isinstance(end, TerminalExit) and end.reason is ExitReason.SESSION_CLOSED
    closed = await shell.next_for("")
    assert isinstance(closed, TunnelClosed) and closed.req_id == "r-tclose"
    assert shell.order.index(end) < shell.order.index(closed)
    assert await wait_pids_gone([shell_pid, job_pid]) == []
