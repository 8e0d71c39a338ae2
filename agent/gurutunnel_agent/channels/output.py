"""The numbered output of one terminal or shell channel: chunks, then exactly one exit frame.

Contract:
- Frames of a channel carry ``seq`` 0, 1, 2, ... in the order they are handed to ``emit``; the
  number is taken before the send, so a send interrupted half-way leaves a visible gap, never a
  duplicate number.
- Nothing is emitted before :meth:`ChannelOutput.open` (the client sends ``terminal.started`` /
  ``channel.opened`` first, then opens the output).
- ``emit`` is the client's one serialized send path; awaiting it is the back-pressure (the pipe
  reader waits for a slow socket instead of buffering). An exception from ``emit`` (socket gone)
  is logged once and every later frame is dropped: the caller keeps draining its pipes.
- :meth:`exit` sends the ``terminal.exit`` frame; it may be called once, after which the output is
  closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gurutunnel_protocol.messages import (
    AgentToServer,
    ExitReason,
    OutputStream,
    TerminalChunk,
    TerminalExit,
)

log = logging.getLogger(__name__)

Emit = Callable[[AgentToServer], Awaitable[None]]
"""Send one frame through the client's serialized send path."""

_MAX_ERROR_CHARS = 1024


class ChannelOutput:
    """Numbered, ordered, back-pressured output of one channel."""

    def __init__(self, session_id: str, channel_id: str, emit: Emit) -> None:
        self.session_id = session_id
        self.channel_id = channel_id
        self._emit = emit
        self._lock = asyncio.Lock()
        self._opened = asyncio.Event()
        self._seq = 0
        self._broken = False
        self.exited = False

    @property
    def next_seq(self) -> int:
        return self._seq

    def open(self) -> None:
        """Allow frames to leave (after the channel's start was answered)."""
        self._opened.set()

    async def chunk(self, stream: OutputStream, data: bytes) -> None:
        await self._send(
            lambda seq: TerminalChunk(
                session_id=self.session_id,
                channel_id=self.channel_id,
                seq=seq,
                stream=stream,
                data=data,
            )
        )

    async def exit(
        self,
        reason: ExitReason,
        *,
        exit_code: int | None,
        duration_s: float,
        stdout_bytes: int,
        stderr_bytes: int,
        truncated: bool = False,
        error: str | None = None,
    ) -> None:
        if self.exited:
            raise RuntimeError("the exit frame of a channel is sent once")
        self.exited = True
        await self._send(
            lambda seq: TerminalExit(
                session_id=self.session_id,
                channel_id=self.channel_id,
                seq=seq,
                reason=reason,
                exit_code=exit_code,
                truncated=truncated,
                duration_s=max(duration_s, 0.0),
                stdout_bytes=stdout_bytes,
                stderr_bytes=stderr_bytes,
                error=error[:_MAX_ERROR_CHARS] if error is not None else None,
            ),
            final=True,
        )

    async def _send(self, build: Callable[[int], AgentToServer], *, final: bool = False) -> None:
        if self.exited and not final:
            return
        await self._opened.wait()
        async with self._lock:
            seq = self._seq
            self._seq += 1
            if self._broken:
                return
            try:
                await self._emit(build(seq))
            except Exception as exc:
                # the socket is gone: the channel is being ended by the client; keep draining
                self._broken = True
                log.warning(
                    "channel output undeliverable; dropping the rest",
                    extra={"channel_id": self.channel_id, "error": type(exc).__name__},
                )
