"""The numbered output of one terminal or shell channel: chunks, then exactly one exit frame.

Contract:
- Frames of a channel carry ``seq`` 0, 1, 2, ... in the order they are handed to ``emit``; the
  number is taken before the send, so a send interrupted half-way leaves a visible gap, never a
  duplicate number.
- Nothing is emitted before :meth:`ChannelOutput.open` (the client sends ``terminal.started`` /
  ``channel.opened`` first, then opens the output).
- With ``hold_bytes`` > 0, frames produced before the answer are *held* instead of waiting:
  chunks up to ``hold_bytes`` of data in all (and ``MAX_INLINE_CHUNKS`` frames), and the exit
  frame. :meth:`ChannelOutput.settle` waits (bounded) until the channel ended or a frame did not
  fit, stops holding and hands the held frames over for the answer (``terminal.started.output``
  and ``.exit``). A frame that does not fit, and every later one, waits for :meth:`open` as
  without holding; held frames keep their ``seq``, so numbering stays gapless in every case.
- ``emit`` is the client's one serialized send path; awaiting it is the back-pressure (the pipe
  reader waits for a slow socket instead of buffering). An exception from ``emit`` (socket gone)
  is logged once and every later frame is dropped: the caller keeps draining its pipes.
- :meth:`exit` sends the ``terminal.exit`` frame; it may be called once, after which the output is
  closed.
- With ``window_bytes`` (output flow control, ``gurutunnel_protocol.messages.terminal``), a chunk
  waits before it takes its ``seq`` while the chunks sent or held and not yet acknowledged,
  counted with :func:`chunk_cost`, would pass the window with it (:class:`OutputWindow`, the
  output's ``window``: ``ack``, ``unthrottle`` once the channel is stopping, ``piece_bytes`` to
  size reads); a chunk alone in flight never waits, the exit frame never does. Two readers of
  one channel (stdout, stderr) may each pass the check before either takes its ``seq``: the
  window can be passed by one chunk per reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from gurutunnel_protocol.messages import (
    CHUNK_COST_BYTES,
    MAX_INLINE_CHUNKS,
    AgentToServer,
    ExitReason,
    OutputStream,
    TerminalChunk,
    TerminalExit,
    chunk_cost,
)

log = logging.getLogger(__name__)

Emit = Callable[[AgentToServer], Awaitable[None]]
"""Send one frame through the client's serialized send path."""

_MAX_ERROR_CHARS = 1024


class OutputWindow:
    """One channel's output window (``window_bytes``, the protocol's flow control): the chunks
    sent and not acknowledged, and the wait for room. Without a size nothing is counted and
    nothing waits. Also the simulated agents' (``bench.simagent``)."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        self._unacked: deque[tuple[int, int]] = deque()
        """(seq, cost) of the chunks sent and not acknowledged, in ``seq`` order."""
        self.unacked_cost = 0
        self._moved = asyncio.Event()
        """Set by every :meth:`ack` and by :meth:`unthrottle`: waiting chunks check again."""
        self._unthrottled = False

    def piece_bytes(self, chunk_bytes: int) -> int:
        """How much to read for one chunk: ``chunk_bytes``, but with a window at most what
        costs a quarter of it (the protocol's rule that keeps acknowledgements coming)."""
        if self.size is None:
            return chunk_bytes
        return max(1, min(chunk_bytes, self.size // 4 - CHUNK_COST_BYTES))

    def sent(self, seq: int, cost: int) -> None:
        """Chunk ``seq`` left (or is held for the answer) and takes ``cost`` of the window."""
        if self.size is not None:
            self._unacked.append((seq, cost))
            self.unacked_cost += cost

    def ack(self, seq: int) -> None:
        """The receiver consumed (or lost) every frame up to ``seq``: their window is free."""
        unacked = self._unacked
        while unacked and unacked[0][0] <= seq:
            self.unacked_cost -= unacked.popleft()[1]
        self._moved.set()

    def unthrottle(self) -> None:
        """The channel is stopping: from now on no chunk waits for the window."""
        self._unthrottled = True
        self._moved.set()

    async def room_for(self, cost: int) -> None:
        """Wait until a chunk of ``cost`` fits (or is alone in flight, or the window is lifted)."""
        while (
            self.size is not None
            and not self._unthrottled
            and self._unacked
            and self.unacked_cost + cost > self.size
        ):
            self._moved.clear()
            await self._moved.wait()


class ChannelOutput:
    """Numbered, ordered, back-pressured output of one channel."""

    def __init__(
        self,
        session_id: str,
        channel_id: str,
        emit: Emit,
        *,
        hold_bytes: int = 0,
        window_bytes: int | None = None,
    ) -> None:
        self.session_id = session_id
        self.channel_id = channel_id
        self._emit = emit
        self._lock = asyncio.Lock()
        self._opened = asyncio.Event()
        self._answer_opens = False
        self._seq = 0
        self._broken = False
        self.exited = False
        self._hold_bytes = hold_bytes
        self._holding = hold_bytes > 0
        self._held: list[TerminalChunk | TerminalExit] = []
        self._held_size = 0
        self._settled = asyncio.Event()
        """Holding cannot go on: the exit frame is held, or a frame did not fit."""
        self.window = OutputWindow(window_bytes)

    @property
    def holding(self) -> bool:
        """Frames are kept for the answer (until :meth:`settle`)."""
        return self._holding

    @property
    def next_seq(self) -> int:
        return self._seq

    def open(self) -> None:
        """Allow frames to leave (after the channel's start was answered)."""
        self._opened.set()

    def answer_opens(self) -> None:
        """The channel's answer is sent by a task of its own, which calls :meth:`open` once the
        answer left or was given up (in every case): :meth:`open_for_stop` then leaves opening
        to it, or a frame that no longer fits the hold would overtake the answer carrying the
        frames numbered before it."""
        self._answer_opens = True

    def release(self) -> None:
        """Stop holding for good (the channel's answer is over, sent or not): frames from now
        on wait only for :meth:`open`."""
        self._holding = False
        self._settled.set()

    def not_delivered(self, exit_frame: TerminalExit | None) -> None:
        """The answer carrying the held frames did not leave (cancelled while sending): when it
        carried the exit frame, the channel has not ended for its reader, and a best-effort
        exit may still be sent (numbered after the lost frames: the reader sees the gap)."""
        if exit_frame is not None:
            self.exited = False

    def open_for_stop(self) -> None:
        """A stop must be able to end the channel: open, unless the answer will
        (:meth:`answer_opens`)."""
        if not self._answer_opens:
            self._opened.set()

    async def settle(self, window_s: float) -> tuple[list[TerminalChunk], TerminalExit | None]:
        """Stop holding once the channel ended, a frame did not fit, or after ``window_s``;
        return the held chunks and exit frame (for the answer; see the module contract)."""
        try:
            if self._holding:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(window_s):
                        await self._settled.wait()
        finally:
            # even when cancelled: a holding output would keep every later frame, exit included
            self._holding = False
        held, self._held = self._held, []
        chunks = [f for f in held if isinstance(f, TerminalChunk)]
        exits = [f for f in held if isinstance(f, TerminalExit)]  # at most one, the last
        return chunks, exits[0] if exits else None

    async def chunk(self, stream: OutputStream, data: bytes) -> None:
        cost = chunk_cost(len(data))
        await self.window.room_for(cost)
        await self._send(
            lambda seq: TerminalChunk(
                session_id=self.session_id,
                channel_id=self.channel_id,
                seq=seq,
                stream=stream,
                data=data,
            ),
            cost=cost,
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

    async def _send(
        self, build: Callable[[int], AgentToServer], *, final: bool = False, cost: int = 0
    ) -> None:
        if self.exited and not final:
            return
        # held even once opened (a stop before the answer opens the output): the answer that
        # settle() builds carries them, ahead of every later frame
        if self._holding and self._hold(build(self._seq), cost):
            return
        await self._opened.wait()
        async with self._lock:
            seq = self._seq
            self._seq += 1
            if cost:
                self.window.sent(seq, cost)
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

    def _hold(self, frame: AgentToServer, cost: int) -> bool:
        """Keep ``frame`` for the answer if it fits; else stop holding (it waits for ``open``)."""
        assert isinstance(frame, TerminalChunk | TerminalExit)
        size = len(frame.data) if isinstance(frame, TerminalChunk) else 0
        fits = isinstance(frame, TerminalExit) or (
            self._held_size + size <= self._hold_bytes and len(self._held) < MAX_INLINE_CHUNKS
        )
        if not fits:
            self._holding = False
            self._settled.set()
            return False
        # no await since the check in _send: no other frame can take this seq meanwhile
        if cost:
            self.window.sent(self._seq, cost)
        self._seq += 1
        self._held.append(frame)
        self._held_size += size
        if isinstance(frame, TerminalExit):
            self._settled.set()
        return True
