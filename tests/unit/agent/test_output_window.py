"""A channel's output window (``window_bytes``): what waits, what frees it, what never waits."""

from __future__ import annotations

import asyncio

import pytest

from gurutunnel_agent.channels.output import ChannelOutput
from gurutunnel_agent.tunnel import OutputAcked, TunnelManager
from gurutunnel_protocol.messages import (
    CHUNK_COST_BYTES,
    AgentToServer,
    ExitReason,
    FileDownload,
    OutputStream,
    ShellOpen,
    Terminal,
    TerminalAck,
    TerminalChunk,
    TerminalExit,
    chunk_cost,
)

WINDOW = 4096
PIECE = WINDOW // 4 - CHUNK_COST_BYTES


def _output(window: int | None = WINDOW, hold: int = 0) -> tuple[ChannelOutput, list[int]]:
    sent: list[int] = []

    async def emit(frame: AgentToServer) -> None:
        assert isinstance(frame, TerminalChunk | TerminalExit)
        sent.append(frame.seq)

    output = ChannelOutput("s1", "c1", emit, hold_bytes=hold, window_bytes=window)
    output.open()
    return output, sent


async def _blocked(coro: asyncio.Future[None] | asyncio.Task[None]) -> bool:
    await asyncio.sleep(0.05)
    return not coro.done()


async def test_a_chunk_past_the_window_waits_for_an_ack() -> None:
    output, sent = _output()
    for _ in range(4):  # 4 x (768 + 256) = the whole window
        await output.chunk(OutputStream.STDOUT, b"x" * PIECE)
    assert output.window.unacked_cost == 4 * chunk_cost(PIECE) == WINDOW
    fifth = asyncio.ensure_future(output.chunk(OutputStream.STDOUT, b"x"))
    assert await _blocked(fifth)
    assert sent == [0, 1, 2, 3]
    output.window.ack(0)  # one chunk's worth freed: the fifth fits
    await asyncio.wait_for(fifth, 1)
    assert sent == [0, 1, 2, 3, 4]
    assert output.window.unacked_cost == 3 * chunk_cost(PIECE) + chunk_cost(1)


async def test_one_ack_wakes_both_readers_of_a_channel() -> None:
    """stdout and stderr both wait for the window: one ack big enough lets both go."""
    output, sent = _output()
    for _ in range(4):
        await output.chunk(OutputStream.STDOUT, b"x" * PIECE)
    out = asyncio.ensure_future(output.chunk(OutputStream.STDOUT, b"o" * PIECE))
    err = asyncio.ensure_future(output.chunk(OutputStream.STDERR, b"e" * PIECE))
    assert await _blocked(out) and await _blocked(err)
    output.window.ack(3)
    await asyncio.wait_for(asyncio.gather(out, err), 1)
    assert sent == [0, 1, 2, 3, 4, 5]


async def test_an_ack_frees_every_frame_up_to_its_seq_and_no_more() -> None:
    output, _ = _output()
    for _ in range(3):
        await output.chunk(OutputStream.STDOUT, b"x" * 100)
    output.window.ack(1)
    assert output.window.unacked_cost == chunk_cost(100)
    output.window.ack(0)  # an older ack changes nothing
    assert output.window.unacked_cost == chunk_cost(100)
    output.window.ack(99)  # beyond what was sent: everything, nothing more
    assert output.window.unacked_cost == 0


async def test_the_exit_frame_and_a_lone_chunk_never_wait() -> None:
    output, sent = _output()
    await output.chunk(OutputStream.STDOUT, b"x" * (2 * WINDOW))  # alone in flight: goes
    assert sent == [0]
    await output.exit(ExitReason.EXITED, exit_code=0, duration_s=0, stdout_bytes=1, stderr_bytes=0)
    assert sent == [0, 1]


async def test_unthrottle_releases_a_waiting_chunk_and_every_later_one() -> None:
    output, sent = _output()
    for _ in range(4):
        await output.chunk(OutputStream.STDOUT, b"x" * PIECE)
    waiting = asyncio.ensure_future(output.chunk(OutputStream.STDERR, b"y" * PIECE))
    assert await _blocked(waiting)
    output.window.unthrottle()
    await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(output.chunk(OutputStream.STDOUT, b"z" * PIECE), 1)
    assert sent == [0, 1, 2, 3, 4, 5]


async def test_held_chunks_take_window_too() -> None:
    """Chunks held for the inline answer count: the answer carries them unacknowledged."""
    output, _ = _output(hold=2 * WINDOW)
    for _ in range(4):
        await output.chunk(OutputStream.STDOUT, b"x" * PIECE)
    assert output.window.unacked_cost == WINDOW
    waiting = asyncio.ensure_future(output.chunk(OutputStream.STDOUT, b"x"))
    assert await _blocked(waiting)
    output.window.ack(3)
    await asyncio.wait_for(waiting, 1)


async def test_without_a_window_nothing_waits_or_is_counted() -> None:
    output, sent = _output(window=None)
    for _ in range(20):
        await output.chunk(OutputStream.STDOUT, b"x" * WINDOW)
    assert len(sent) == 20 and output.window.unacked_cost == 0
    assert output.window.piece_bytes(32768) == 32768


def test_pieces_cost_at_most_a_quarter_of_the_window() -> None:
    output, _ = _output(window=256 * 1024)
    assert output.window.piece_bytes(32768) == 32768
    assert output.window.piece_bytes(512 * 1024) == 64 * 1024 - CHUNK_COST_BYTES
    small, _ = _output(window=4096)
    assert chunk_cost(small.window.piece_bytes(32768)) == 1024


@pytest.fixture
def tunnel() -> TunnelManager:
    t = TunnelManager(max_channels=4)
    t.open_tunnel("s1", "tech1")
    return t


def test_an_ack_reaches_a_running_command_or_shell_only(tunnel: TunnelManager) -> None:
    tunnel.handle(Terminal(session_id="s1", channel_id="t1", command="true", window_bytes=8192))
    tunnel.handle(ShellOpen(session_id="s1", channel_id="sh"))
    tunnel.handle(FileDownload(req_id="d", session_id="s1", channel_id="f1", path="/tmp/x"))
    assert tunnel.handle(TerminalAck(session_id="s1", channel_id="t1", seq=3)) == [
        OutputAcked("s1", "t1", 3)
    ]
    assert tunnel.handle(TerminalAck(session_id="s1", channel_id="sh", seq=0)) == [
        OutputAcked("s1", "sh", 0)
    ]
    # a file channel, a channel that ended (or never was), another session: dropped, unanswered
    assert tunnel.handle(TerminalAck(session_id="s1", channel_id="f1", seq=0)) == []
    assert tunnel.handle(TerminalAck(session_id="s1", channel_id="zz", seq=0)) == []
    assert tunnel.handle(TerminalAck(session_id="s2", channel_id="t1", seq=0)) == []


def test_the_window_is_bounded_by_the_protocol() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 4096"):
        Terminal(session_id="s1", channel_id="t1", command="true", window_bytes=1024)
    with pytest.raises(ValueError, match="less than or equal to 67108864"):
        ShellOpen(session_id="s1", channel_id="sh", window_bytes=1 << 30)
