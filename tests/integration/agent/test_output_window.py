"""Output flow control through the real agent, real processes, over a real WebSocket.

A command or shell sent with ``window_bytes`` keeps at most that much output unacknowledged:
these tests play the receiver, withhold ``terminal.ack`` and check that the agent stops (and
the process with it), then acknowledge and check that every byte arrives, in order.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence

import pytest

from gurutunnel_protocol.messages import (
    CHUNK_COST_BYTES,
    ChannelOpened,
    ExitReason,
    ShellOpen,
    Terminal,
    TerminalAck,
    TerminalCancel,
    TerminalChunk,
    TerminalExit,
    TerminalStarted,
    TunnelData,
    chunk_cost,
)
from tests.integration.agent.tunnel_harness import SESSION, Tunnel, wait_pids_gone

OpenTunnel = Callable[..., Awaitable[Tunnel]]

WINDOW = 64 * 1024
PIECE = WINDOW // 4 - CHUNK_COST_BYTES
LINE = b"x" * 999 + b"\n"
LINES = 2000
# 2 MB in 1000-byte writes: 30x the window
WRITER = f"import sys\nfor _ in range({LINES}): sys.stdout.write('x' * 999 + '\\n')\n"


def command(channel_id: str, *, window: int | None = WINDOW, **fields: object) -> Terminal:
    return Terminal(
        req_id=f"r-{channel_id}",
        session_id=SESSION,
        channel_id=channel_id,
        argv=[sys.executable, "-c", WRITER],
        window_bytes=window,
        **fields,
    )


async def _until_window_full(tunnel: Tunnel, channel_id: str) -> list[object]:
    """Frames of ``channel_id`` until its chunks fill the window less one piece (bounded
    generously: a loaded machine may take seconds to start the child), then until quiet."""
    frames: list[object] = []
    async with asyncio.timeout(30):
        while _cost(frames) <= WINDOW - chunk_cost(PIECE):
            frames.append(await tunnel.next_for(channel_id, timeout_s=30))
            if isinstance(frames[-1], TerminalExit):
                return frames
    return frames + await _until_quiet(tunnel, channel_id)


async def _until_quiet(tunnel: Tunnel, channel_id: str, quiet_s: float = 0.5) -> list[object]:
    """Every frame of ``channel_id`` until none came for ``quiet_s``."""
    frames: list[object] = []
    while True:
        try:
            frame = await tunnel.next_for(channel_id, timeout_s=quiet_s)
        except TimeoutError:
            return frames
        frames.append(frame)


def _cost(frames: Sequence[object]) -> int:
    return sum(chunk_cost(len(f.data)) for f in frames if isinstance(f, TerminalChunk))


async def test_output_stops_at_the_window_until_acknowledged(open_tunnel: OpenTunnel) -> None:
    """Without acks the agent sends one window (plus at most one chunk per stream) and stops;
    acknowledging as it reads, the receiver gets all 2 MB in order and the exit."""
    tunnel = await open_tunnel()
    await tunnel.send(command("c1"))
    first = await _until_window_full(tunnel, "c1")
    assert isinstance(first[0], TerminalStarted)
    assert first[0].window_bytes == WINDOW  # the agent says it applies the window
    chunks = [f for f in first if isinstance(f, TerminalChunk)]
    assert not any(isinstance(f, TerminalExit) for f in first), "the command ran unthrottled"
    piece = PIECE
    assert all(len(c.data) <= piece for c in chunks)
    assert WINDOW - chunk_cost(piece) < _cost(chunks) <= WINDOW + 2 * chunk_cost(piece)

    # still stopped a while later: the process blocks on its pipe, nothing beyond the window
    # leaves (a last small read may still fit in what is left of it)
    later = await _until_quiet(tunnel, "c1", quiet_s=0.5)
    assert not any(isinstance(f, TerminalExit) for f in later)
    chunks += [f for f in later if isinstance(f, TerminalChunk)]
    assert _cost(chunks) <= WINDOW + 2 * chunk_cost(piece)

    received = b"".join(c.data for c in chunks)
    seqs = [c.seq for c in chunks]
    unacked_max = _cost(chunks)
    await tunnel.send(TerminalAck(session_id=SESSION, channel_id="c1", seq=chunks[-1].seq))
    in_flight = 0
    exit_frame: TerminalExit | None = None
    async with asyncio.timeout(30):
        while exit_frame is None:
            frame = await tunnel.next_for("c1")
            if isinstance(frame, TerminalExit):
                exit_frame = frame
                break
            assert isinstance(frame, TerminalChunk)
            received += frame.data
            seqs.append(frame.seq)
            in_flight += chunk_cost(len(frame.data))
            unacked_max = max(unacked_max, in_flight)
            # a receiver that acks every quarter window, as the API does
            if in_flight >= WINDOW // 4:
                await tunnel.send(TerminalAck(session_id=SESSION, channel_id="c1", seq=frame.seq))
                in_flight = 0
    assert received == LINE * LINES
    assert seqs == list(range(len(seqs)))
    assert exit_frame.seq == len(seqs)
    assert (exit_frame.reason, exit_frame.exit_code) == (ExitReason.EXITED, 0)
    assert exit_frame.stdout_bytes == len(LINE) * LINES
    assert unacked_max <= WINDOW + 2 * chunk_cost(piece)


async def test_without_a_window_output_is_not_held_back(open_tunnel: OpenTunnel) -> None:
    """A sender that asks for no window (an older API) gets the whole output unacknowledged."""
    tunnel = await open_tunnel()
    await tunnel.send(command("c1", window=None))
    result = await tunnel.collect("c1", timeout_s=30)
    assert isinstance(result.answer, TerminalStarted) and result.answer.window_bytes is None
    assert result.exit is not None
    assert result.output() == LINE * LINES
    result.assert_contiguous()


async def test_a_cancel_ends_a_command_waiting_for_the_window(open_tunnel: OpenTunnel) -> None:
    """No ack ever comes: terminal.cancel still ends the channel at once, what the pipe held
    is sent (numbered, nothing lost silently) and the process tree is gone."""
    tunnel = await open_tunnel()
    await tunnel.send(command("c1"))
    first = await _until_window_full(tunnel, "c1")
    started = first[0]
    assert isinstance(started, TerminalStarted) and started.pid is not None
    await tunnel.send(TerminalCancel(session_id=SESSION, channel_id="c1"))
    rest = await _until_quiet(tunnel, "c1", quiet_s=3.0)
    exits = [f for f in rest if isinstance(f, TerminalExit)]
    assert len(exits) == 1 and exits[0].reason == ExitReason.CANCELLED
    chunks = [f for f in [*first, *rest] if isinstance(f, TerminalChunk)]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert exits[0].seq == len(chunks)
    assert await wait_pids_gone([started.pid]) == []


async def test_a_timeout_ends_a_command_waiting_for_the_window(open_tunnel: OpenTunnel) -> None:
    """No ack ever comes: the command's own timeout still ends it (bounded)."""
    tunnel = await open_tunnel()
    await tunnel.send(command("c1", timeout_s=1.0))
    frames = await _until_quiet(tunnel, "c1", quiet_s=5.0)
    exits = [f for f in frames if isinstance(f, TerminalExit)]
    assert len(exits) == 1 and exits[0].reason == ExitReason.TIMEOUT
    assert _cost([f for f in frames if isinstance(f, TerminalChunk)]) < len(LINE) * LINES


async def test_an_ack_of_an_unknown_channel_is_ignored(open_tunnel: OpenTunnel) -> None:
    """A late ack (the channel ended) or one naming nothing gets no answer and breaks nothing."""
    tunnel = await open_tunnel()
    await tunnel.send(TerminalAck(session_id=SESSION, channel_id="gone", seq=5))
    await tunnel.send(TerminalAck(session_id="other", channel_id="c1", seq=5))
    await tunnel.send(command("c1", window=None))
    result = await tunnel.collect("c1", timeout_s=30)
    assert result.exit is not None and result.exit.exit_code == 0
    assert "gone" not in tunnel.stash and "" not in [k for k, v in tunnel.stash.items() if v]


@pytest.mark.skipif(sys.platform == "win32", reason="no PTY shell on Windows")
async def test_a_shell_stops_at_its_window_until_acknowledged(open_tunnel: OpenTunnel) -> None:
    """A shell's output is flow-controlled like a command's."""
    tunnel = await open_tunnel()
    await tunnel.send(
        ShellOpen(req_id="r-sh", session_id=SESSION, channel_id="sh", window_bytes=16 * 1024)
    )
    opened = await tunnel.next_for("sh")
    assert isinstance(opened, ChannelOpened) and opened.window_bytes == 16 * 1024
    # 'E' 'ND': the terminal's echo of the command line must not contain the marker
    script = f"{sys.executable} -c \"import sys; sys.stdout.write('y' * 400000 + 'E' 'ND')\"\n"
    await tunnel.send(TunnelData(session_id=SESSION, channel_id="sh", data=script.encode()))
    frames = await _until_quiet(tunnel, "sh", quiet_s=1.0)
    chunks = [f for f in frames if isinstance(f, TerminalChunk)]
    assert chunks
    assert _cost(chunks) <= 16 * 1024 + chunk_cost(16 * 1024 // 4)
    received = b"".join(c.data for c in chunks)
    async with asyncio.timeout(30):
        while b"END" not in received:
            await tunnel.send(TerminalAck(session_id=SESSION, channel_id="sh", seq=chunks[-1].seq))
            frame = await tunnel.next_for("sh")
            assert isinstance(frame, TerminalChunk)
            chunks.append(frame)
            received += frame.data
    assert received.count(b"y") >= 400000
    assert [c.seq for c in chunks] == list(range(len(chunks)))
