"""Integration tests of command execution: real agent, real processes, real WebSocket."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Awaitable, Callable

from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages import (
    ExitReason,
    OutputStream,
    Terminal,
    TerminalCancel,
    TerminalChunk,
    TerminalExit,
    TerminalStarted,
    TunnelClose,
    TunnelClosed,
    TunnelError,
)
from tests.integration.agent.fake_gateway import FakeGateway
from tests.integration.agent.tunnel_harness import SESSION, Tunnel, wait_pids_gone

OpenTunnel = Callable[..., Awaitable[Tunnel]]

# prints the pid of a background child, then waits for it: a two-process tree
TREE = "sleep 60 & echo $!; wait"


def cmd(channel_id: str, command: str | None = None, **fields: object) -> Terminal:
    values: dict[str, object] = {"req_id": f"r-{channel_id}", "session_id": SESSION}
    if command is not None:
        values["command"] = command
    return Terminal.model_validate({"channel_id": channel_id, **values, **fields})


async def test_echo_streams_chunks_then_exit_0(open_tunnel: OpenTunnel) -> None:
    """`echo hi` -> terminal.started{pid} (same req_id), its output, exit 0, seq contiguous."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", "echo hi"))
    result = await tunnel.collect("c1")
    assert isinstance(result.answer, TerminalStarted)
    assert result.answer.req_id == "r-c1"
    assert isinstance(result.answer.pid, int)
    assert result.output() == b"hi\n"
    assert result.exit is not None
    assert (result.exit.reason, result.exit.exit_code) == (ExitReason.EXITED, 0)
    assert (result.exit.stdout_bytes, result.exit.stderr_bytes) == (3, 0)
    assert result.exit.truncated is False
    result.assert_contiguous()


async def test_exit_code_is_reported(open_tunnel: OpenTunnel) -> None:
    """`exit 1` ends with reason exited and exit_code 1."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", "exit 1"))
    result = await tunnel.collect("c1")
    assert result.exit is not None
    assert (result.exit.reason, result.exit.exit_code) == (ExitReason.EXITED, 1)


async def test_missing_binary_in_argv_is_spawn_failed(open_tunnel: OpenTunnel) -> None:
    """argv naming a missing program: started without pid, then exit spawn_failed with reason."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", argv=["gt-no-such-binary-xyz", "arg"]))
    result = await tunnel.collect("c1")
    assert isinstance(result.answer, TerminalStarted)
    assert result.answer.pid is None
    assert result.exit is not None
    assert result.exit.reason is ExitReason.SPAWN_FAILED
    assert result.exit.exit_code is None
    assert result.exit.error == "command not found: gt-no-such-binary-xyz"
    assert result.exit.seq == 0


async def test_unknown_command_in_shell_exits_127(open_tunnel: OpenTunnel) -> None:
    """Through the shell, an unknown command is a normal exit 127 with the shell's message."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", "gt-no-such-command-xyz"))
    result = await tunnel.collect("c1")
    assert result.exit is not None
    assert (result.exit.reason, result.exit.exit_code) == (ExitReason.EXITED, 127)
    assert b"gt-no-such-command-xyz" in result.output(OutputStream.STDERR)


async def test_stdout_and_stderr_are_kept_apart(open_tunnel: OpenTunnel) -> None:
    """Each chunk names its stream; the two outputs do not mix."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", "echo out; echo err >&2; echo out2"))
    result = await tunnel.collect("c1")
    assert result.output(OutputStream.STDOUT) == b"out\nout2\n"
    assert result.output(OutputStream.STDERR) == b"err\n"
    assert result.exit is not None
    assert (result.exit.stdout_bytes, result.exit.stderr_bytes) == (9, 4)
    result.assert_contiguous()


async def test_argv_reaches_the_program_without_a_shell(open_tunnel: OpenTunnel) -> None:
    """Shell metacharacters in argv are plain bytes to the program."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", argv=["echo", "$HOME; rm -rf / `x` | y"]))
    result = await tunnel.collect("c1")
    assert result.output() == b"$HOME; rm -rf / `x` | y\n"


async def test_ten_megabytes_arrive_complete_and_in_order(open_tunnel: OpenTunnel) -> None:
    """10 MiB of output: the joined chunks hash like the bytes written, seq contiguous."""
    tunnel = await open_tunnel()
    size = 10 * 1024 * 1024
    script = (
        "import sys\n"
        "block = bytes(range(256)) * 4096\n"  # 1 MiB, every byte value
        "for i in range(10):\n"
        "    sys.stdout.buffer.write(bytes([i]) + block[1:])\n"
    )
    expected = b"".join(bytes([i]) + (bytes(range(256)) * 4096)[1:] for i in range(10))
    assert len(expected) == size
    await tunnel.send(cmd("c1", argv=[sys.executable, "-c", script]))
    result = await tunnel.collect("c1", timeout_s=30)
    assert result.exit is not None
    assert (result.exit.reason, result.exit.exit_code) == (ExitReason.EXITED, 0)
    assert result.exit.stdout_bytes == size
    result.assert_contiguous()
    assert max(len(c.data) for c in result.chunks) <= 32 * 1024
    assert hashlib.sha256(result.output()).hexdigest() == hashlib.sha256(expected).hexdigest()


async def test_a_short_command_ends_in_its_started_answer(open_tunnel: OpenTunnel) -> None:
    """`echo hi` ends within the inline window: its chunk and exit travel in terminal.started
    (one frame), numbered 0 and 1, and nothing more of the channel follows."""
    tunnel = await open_tunnel(inline_result_window_s=1.0)
    await tunnel.send(cmd("c1", "echo hi", inline_result=True))
    answer = await tunnel.next_for("c1")
    assert isinstance(answer, TerminalStarted) and answer.exit is not None
    assert [(c.seq, c.data) for c in answer.output] == [(0, b"hi\n")]
    assert (answer.exit.seq, answer.exit.reason, answer.exit.exit_code) == (1, "exited", 0)
    assert tunnel.inline["c1"] == 2
    await tunnel.send(cmd("c2", "true"))
    await tunnel.collect("c2")
    assert len([f for f in tunnel.order if getattr(f, "channel_id", None) == "c1"]) == 1


async def test_with_no_inline_window_the_answer_carries_nothing(open_tunnel: OpenTunnel) -> None:
    """inline_result_window_s = 0: terminal.started comes at once, output and exit stream."""
    tunnel = await open_tunnel(inline_result_window_s=0)
    await tunnel.send(cmd("c1", "echo hi", inline_result=True))
    result = await tunnel.collect("c1")
    assert tunnel.inline["c1"] == 0
    assert result.output() == b"hi\n"
    result.assert_contiguous()


async def test_a_request_that_reads_no_inline_result_gets_a_stream(
    open_tunnel: OpenTunnel,
) -> None:
    """Without inline_result in the request (an older API), nothing travels in the answer even
    with a window: a receiver that ignores the answer's new fields loses nothing."""
    tunnel = await open_tunnel(inline_result_window_s=1.0)
    await tunnel.send(cmd("c1", "echo hi"))
    result = await tunnel.collect("c1")
    assert tunnel.inline["c1"] == 0
    assert result.output() == b"hi\n"
    result.assert_contiguous()


async def test_output_beyond_the_inline_bytes_streams_on_in_seq(open_tunnel: OpenTunnel) -> None:
    """100 kB from a quick command with 8 KiB inline: the answer carries what fits (no exit),
    the rest streams, numbered on from the answer's chunks, nothing lost."""
    tunnel = await open_tunnel(
        inline_result_window_s=1.0, inline_result_bytes=8192, chunk_bytes=4096
    )
    script = "import sys; sys.stdout.buffer.write(bytes(range(100)) * 1000)"
    await tunnel.send(cmd("c1", argv=[sys.executable, "-c", script], inline_result=True))
    result = await tunnel.collect("c1")
    assert isinstance(result.answer, TerminalStarted) and result.answer.exit is None
    assert tunnel.inline["c1"] >= 1  # pipe reads may come in pieces: at most 8 KiB of them
    assert sum(len(c.data) for c in result.answer.output) <= 8192
    assert result.output() == bytes(range(100)) * 1000
    result.assert_contiguous()


async def test_a_long_command_is_answered_after_the_window_and_streams(
    open_tunnel: OpenTunnel,
) -> None:
    """A command still running at the end of the window: terminal.started carries its first
    output but no exit, and the rest follows as a stream."""
    tunnel = await open_tunnel(inline_result_window_s=0.3)
    await tunnel.send(cmd("c1", "echo a; sleep 1; echo b", inline_result=True))
    result = await tunnel.collect("c1")
    assert isinstance(result.answer, TerminalStarted) and result.answer.exit is None
    assert [c.data for c in result.answer.output] == [b"a\n"]
    assert result.output() == b"a\nb\n"
    result.assert_contiguous()


async def test_the_reader_goes_on_while_a_command_is_in_its_inline_window(
    open_tunnel: OpenTunnel,
) -> None:
    """A command still running in a long inline window does not hold up the connection: a
    second command sent after it is answered and ends first, and the first's answer follows."""
    tunnel = await open_tunnel(inline_result_window_s=1.0)
    await tunnel.send(cmd("c1", "sleep 0.7; echo late", inline_result=True))
    await tunnel.send(cmd("c2", "echo quick", inline_result=True))
    quick = await tunnel.collect("c2", timeout_s=0.6)
    assert quick.output() == b"quick\n"
    assert not any(getattr(f, "channel_id", None) == "c1" for f in tunnel.order)
    late = await tunnel.collect("c1")
    assert isinstance(late.answer, TerminalStarted) and late.answer.exit is not None
    assert late.output() == b"late\n"
    late.assert_contiguous()


async def test_tunnel_close_in_the_inline_window_sends_the_answer_and_exit_first(
    open_tunnel: OpenTunnel,
) -> None:
    """tunnel.close while a command's answer waits in its inline window: the answer (carrying
    the session_closed exit) leaves before tunnel.closed, and the process tree is gone."""
    tunnel = await open_tunnel(inline_result_window_s=1.0)
    await tunnel.send(cmd("c1", TREE, inline_result=True))
    await asyncio.sleep(0.2)  # started (a child pid printed) and held: nothing sent yet
    assert tunnel.order == []
    await tunnel.send(TunnelClose(req_id="close", session_id=SESSION))
    closed = await tunnel.next_for("", timeout_s=3.0)
    assert isinstance(closed, TunnelClosed)
    result = await tunnel.collect("c1")
    assert isinstance(result.answer, TerminalStarted) and result.answer.exit is not None
    assert result.answer.exit.reason is ExitReason.SESSION_CLOSED
    assert tunnel.order.index(result.answer) < tunnel.order.index(closed)
    child = int(result.output().split()[0])
    assert result.answer.pid is not None
    assert await wait_pids_gone([child, result.answer.pid], timeout_s=1.0) == []


async def test_output_after_a_stop_in_the_inline_window_follows_the_answer(
    open_tunnel: OpenTunnel,
) -> None:
    """tunnel.close in the window, then the command writes more than the hold takes (its TERM
    trap): the answer, carrying the held first line, still leaves before any streamed chunk,
    and the numbering runs on from it without a gap."""
    # a kill grace long enough for the trap to write everything, even on a loaded machine
    tunnel = await open_tunnel(
        inline_result_window_s=1.0, inline_result_bytes=1024, kill_grace_s=5.0
    )
    # the trap ignores the TERMs that follow (the kill signals the group and the tree)
    trap = 'trap "" TERM; head -c 5000 /dev/zero | tr "\\0" a; exit 0'
    script = f"trap '{trap}' TERM; echo start; sleep 30 & wait"
    await tunnel.send(cmd("c1", script, inline_result=True))
    await asyncio.sleep(0.2)  # "start" is held for the answer; nothing sent yet
    assert tunnel.order == []
    await tunnel.send(TunnelClose(req_id="close", session_id=SESSION))
    result = await tunnel.collect("c1")
    assert isinstance(result.answer, TerminalStarted)
    assert result.answer.output[0].data == b"start\n"
    mine = [f for f in tunnel.order if getattr(f, "channel_id", None) == "c1"]
    assert mine[0] is result.answer
    out = result.output()
    assert (len(out), out[:6], set(out[6:])) == (5006, b"start\n", {ord("a")}), result
    result.assert_contiguous()


async def test_timeout_kills_the_whole_process_tree(open_tunnel: OpenTunnel) -> None:
    """A shell waiting on a background child: after timeout the exit says so, both are gone."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", TREE, timeout_s=0.5))
    result = await tunnel.collect("c1")
    assert isinstance(result.answer, TerminalStarted)
    assert result.answer.pid is not None
    assert result.exit is not None
    assert result.exit.reason is ExitReason.TIMEOUT
    child = int(result.output().split()[0])
    assert await wait_pids_gone([child, result.answer.pid]) == []


async def test_cancel_kills_the_tree_and_exits_cancelled(open_tunnel: OpenTunnel) -> None:
    """terminal.cancel -> exit cancelled; the shell and its child are gone."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", TREE))
    started = await tunnel.next_for("c1")
    assert isinstance(started, TerminalStarted) and started.pid is not None
    first = await tunnel.next_for("c1")
    assert isinstance(first, TerminalChunk)
    child = int(first.data.split()[0])
    await tunnel.send(TerminalCancel(session_id=SESSION, channel_id="c1"))
    end = await tunnel.next_for("c1")
    assert isinstance(end, TerminalExit)
    assert end.reason is ExitReason.CANCELLED
    assert end.seq == 1
    assert await wait_pids_gone([child, started.pid]) == []


async def test_output_cap_truncates_to_exactly_the_cap(open_tunnel: OpenTunnel) -> None:
    """Past max_output_bytes output is dropped: exactly cap bytes arrive, truncated flagged."""
    tunnel = await open_tunnel(max_output_bytes=50_000)
    script = "import sys; sys.stdout.buffer.write(b'a' * 200000); sys.stderr.write('e' * 100)"
    await tunnel.send(cmd("c1", argv=[sys.executable, "-c", script], max_output_bytes=70_000))
    await tunnel.send(cmd("c2", argv=[sys.executable, "-c", script], max_output_bytes=1000))
    for channel, cap in (("c1", 50_000), ("c2", 1000)):  # the agent's cap, then the request's
        result = await tunnel.collect(channel)
        assert result.exit is not None
        assert result.exit.truncated is True
        delivered = result.output(OutputStream.STDOUT) + result.output(OutputStream.STDERR)
        assert len(delivered) == cap
        assert (result.exit.stdout_bytes, result.exit.stderr_bytes) == (200_000, 100)
        assert (result.exit.reason, result.exit.exit_code) == (ExitReason.EXITED, 0)
        result.assert_contiguous()


async def test_cwd_outside_allowlist_is_refused_and_nothing_runs(open_tunnel: OpenTunnel) -> None:
    """cwd outside the allowlist -> tunnel.error{cwd_not_allowed} (same req_id); no process."""
    tunnel = await open_tunnel()
    marker = tunnel.root / "ran"
    await tunnel.send(cmd("c1", f"touch {marker}", cwd="/"))
    result = await tunnel.collect("c1")
    assert isinstance(result.answer, TunnelError)
    assert (result.answer.code, result.answer.req_id) == (ErrorCode.CWD_NOT_ALLOWED, "r-c1")
    assert not marker.exists()
    # the refused id was not taken: it runs once allowed, in the default directory (the root)
    await tunnel.send(cmd("c1", "pwd -P"))
    ok = await tunnel.collect("c1")
    assert ok.output() == f"{tunnel.root.resolve()}\n".encode()


async def test_two_commands_on_two_channels_run_at_once(open_tunnel: OpenTunnel) -> None:
    """c1 waits for a file that c2 creates: both complete only if they run concurrently."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", "while [ ! -f flag ]; do sleep 0.02; done; echo one", timeout_s=5))
    await tunnel.send(cmd("c2", "touch flag; echo two", timeout_s=5))
    first, second = await tunnel.collect("c1"), await tunnel.collect("c2")
    assert (first.output(), second.output()) == (b"one\n", b"two\n")
    assert first.exit is not None and first.exit.reason is ExitReason.EXITED


async def test_busy_channel_id_and_channel_limit_are_refused(open_tunnel: OpenTunnel) -> None:
    """A running channel id -> channel_exists; past max_channels -> too_many_channels; a
    finished channel frees its id and its slot."""
    tunnel = await open_tunnel(max_channels=2)
    await tunnel.send(cmd("c1", "sleep 60", timeout_s=60))
    assert isinstance(await tunnel.next_for("c1"), TerminalStarted)
    await tunnel.send(cmd("c1", "echo again"))
    busy = await tunnel.next_for("c1")
    assert isinstance(busy, TunnelError) and busy.code is ErrorCode.CHANNEL_EXISTS
    await tunnel.send(cmd("c2", "true"))
    assert (await tunnel.collect("c2")).exit is not None
    await tunnel.send(cmd("c2", "sleep 60", timeout_s=60))
    assert isinstance(await tunnel.next_for("c2"), TerminalStarted)
    await tunnel.send(cmd("c3", "true"))
    full = await tunnel.next_for("c3")
    assert isinstance(full, TunnelError) and full.code is ErrorCode.TOO_MANY_CHANNELS
    await tunnel.send(TerminalCancel(session_id=SESSION, channel_id="c1"))
    assert (await tunnel.collect("c1")).exit is not None


async def test_tunnel_close_ends_commands_with_session_closed_before_closed(
    open_tunnel: OpenTunnel,
) -> None:
    """tunnel.close while a command runs: its exit (session_closed) comes first, the tree is
    gone, then tunnel.closed."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", TREE))
    started = await tunnel.next_for("c1")
    assert isinstance(started, TerminalStarted) and started.pid is not None
    first = await tunnel.next_for("c1")
    assert isinstance(first, TerminalChunk)
    child = int(first.data.split()[0])
    await tunnel.send(TunnelClose(req_id="close", session_id=SESSION))
    closed = await tunnel.next_for("")
    assert isinstance(closed, TunnelClosed) and closed.req_id == "close"
    end = await tunnel.next_for("c1")
    assert isinstance(end, TerminalExit) and end.reason is ExitReason.SESSION_CLOSED
    assert tunnel.order.index(end) < tunnel.order.index(closed)
    # killed before the answer, so no polling needed beyond reaping
    assert await wait_pids_gone([child, started.pid], timeout_s=1.0) == []
    assert tunnel.agent.client.tunnel.channels == {}


async def test_disconnect_kills_running_commands(
    open_tunnel: OpenTunnel, gateway: FakeGateway
) -> None:
    """An abrupt socket loss force-closes the session and kills its process trees."""
    tunnel = await open_tunnel()
    await tunnel.send(cmd("c1", TREE))
    started = await tunnel.next_for("c1")
    assert isinstance(started, TerminalStarted) and started.pid is not None
    first = await tunnel.next_for("c1")
    assert isinstance(first, TerminalChunk)
    child = int(first.data.split()[0])
    tunnel.ws.transport.abort()
    await gateway.next_connection()  # the agent reconnected (in heartbeat mode)
    assert await wait_pids_gone([child, started.pid]) == []
