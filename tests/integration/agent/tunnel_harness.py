"""Drive an agent's tunnel session through the fake gateway: send frames, collect each channel.

Frames from the agent are sorted by ``channel_id`` (session-level ones under ``""``), so tests
can run several channels at once and read each one in order. The chunks and exit frame a
``terminal.started`` answer carries (``output``, ``exit``) are read right after it, as the API
reads them: a test sees one channel stream whether the agent sent them inline or not.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from websockets.asyncio.server import ServerConnection

from gurutunnel_protocol.messages import (
    AgentToServer,
    ChannelClosed,
    ChannelOpened,
    Heartbeat,
    OutputStream,
    ServerToAgent,
    TerminalChunk,
    TerminalExit,
    TerminalStarted,
    TunnelClosed,
    TunnelError,
)
from tests.integration.agent.fake_gateway import FakeGateway

if TYPE_CHECKING:
    from tests.integration.agent.conftest import RunningAgent

SESSION = "s1"


@dataclass
class Result:
    """Everything one command channel sent, in arrival order."""

    answer: TerminalStarted | TunnelError | None = None
    chunks: list[TerminalChunk] = field(default_factory=list)
    exit: TerminalExit | None = None

    def output(self, stream: OutputStream = OutputStream.STDOUT) -> bytes:
        return b"".join(c.data for c in self.chunks if c.stream is stream)

    def assert_contiguous(self) -> None:
        """seq 0..n-1 over the chunks, then n on the exit frame: nothing lost or reordered."""
        assert [c.seq for c in self.chunks] == list(range(len(self.chunks)))
        assert self.exit is not None
        assert self.exit.seq == len(self.chunks)


@dataclass
class Tunnel:
    gateway: FakeGateway
    ws: ServerConnection
    agent: RunningAgent
    root: Path
    session_id: str = SESSION
    stash: dict[str, list[AgentToServer]] = field(default_factory=dict)
    order: list[AgentToServer] = field(default_factory=list)
    """Every non-heartbeat frame in arrival order (to check ordering across channels)."""
    inline: dict[str, int] = field(default_factory=dict)
    """Per channel: how many frames its ``terminal.started`` answer carried."""

    async def send(self, frame: ServerToAgent) -> None:
        await self.gateway.send(self.ws, frame)

    async def next_for(self, channel_id: str, timeout_s: float = 10.0) -> AgentToServer:
        """The next frame of ``channel_id`` ("" = session-level), within ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while not self.stash.get(channel_id):
                item = await self.gateway.received.get()
                frame = item.frame
                if isinstance(frame, Heartbeat):
                    continue
                self.order.append(frame)
                key = getattr(frame, "channel_id", None) or ""
                self.stash.setdefault(key, []).append(frame)
                if isinstance(frame, TerminalStarted):
                    self.inline[key] = len(frame.frames())
                    self.stash[key] += frame.frames()
            return self.stash[channel_id].pop(0)

    async def collect(self, channel_id: str, timeout_s: float = 10.0) -> Result:
        """The answer, the chunks and the exit frame of a command channel (or its refusal)."""
        result = Result()
        async with asyncio.timeout(timeout_s):
            while True:
                frame = await self.next_for(channel_id)
                if isinstance(frame, TerminalStarted | TunnelError) and result.answer is None:
                    result.answer = frame
                    if isinstance(frame, TunnelError):
                        return result
                elif isinstance(frame, TerminalChunk):
                    result.chunks.append(frame)
                elif isinstance(frame, TerminalExit):
                    result.exit = frame
                    return result
                elif isinstance(frame, ChannelOpened | ChannelClosed | TunnelClosed):
                    continue
                else:
                    raise AssertionError(f"unexpected frame on {channel_id}: {frame!r}")

    async def output_until(
        self, channel_id: str, needle: bytes, timeout_s: float = 10.0
    ) -> tuple[bytes, list[AgentToServer]]:
        """Read chunks of ``channel_id`` until the joined output contains ``needle``."""
        seen = b""
        frames: list[AgentToServer] = []
        async with asyncio.timeout(timeout_s):
            while needle not in seen:
                frame = await self.next_for(channel_id)
                frames.append(frame)
                if isinstance(frame, TerminalChunk):
                    seen += frame.data
                elif isinstance(frame, TerminalExit):
                    raise AssertionError(f"channel ended before {needle!r}: {seen[-500:]!r}")
        return seen, frames


def pid_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie waiting for its reaper)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def wait_pids_gone(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    """Poll (bounded) until every pid is gone; the ones still running at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        alive = [pid for pid in pids if not pid_gone(pid)]
        if not alive or loop.time() >= deadline:
            return alive
        await asyncio.sleep(0.02)
