"""A channel run beside its answer (``_run_answered``): the answer never outlives the channel."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from gurutunnel_agent.client import _run_answered


class _Output:
    channel_id = "c1"


class _Runtime:
    """Stands in for a CommandChannel: ``run`` ends when told."""

    def __init__(self) -> None:
        self.output = _Output()
        self.ended = asyncio.Event()

    async def run(self) -> None:
        await self.ended.wait()


async def test_cancelled_while_its_answer_is_still_on_its_way_the_answer_ends_first() -> None:
    """The channel's run is over, its answer waits (a busy socket); the channel task is then
    cancelled (the bound of a channel.close): the answer is cancelled and done before the
    channel task ends, so nothing of it can follow what the reader sends next."""
    runtime = _Runtime()
    answer_may_go = asyncio.Event()
    answer_state: list[str] = []

    async def answer() -> None:
        try:
            await answer_may_go.wait()
            answer_state.append("sent")
        finally:
            answer_state.append("done")

    channel: Any = asyncio.create_task(_run_answered(runtime, answer))  # type: ignore[arg-type]
    runtime.ended.set()
    await asyncio.sleep(0.05)
    assert not channel.done()  # the run is over, the answer is not: the channel waits for it
    channel.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(channel, 1.0)
    assert channel.cancelled()
    assert answer_state == ["done"]


async def test_a_failing_run_still_lets_its_answer_go() -> None:
    """A bug in the channel's run (not a cancel) does not take its answer with it."""
    runtime = _Runtime()
    sent: list[str] = []

    async def failing_run() -> None:
        raise RuntimeError("a bug")

    runtime.run = failing_run  # type: ignore[method-assign]

    async def answer() -> None:
        await asyncio.sleep(0.05)
        sent.append("sent")

    channel = asyncio.create_task(_run_answered(runtime, answer))  # type: ignore[arg-type]
    await asyncio.wait({channel}, timeout=1.0)
    assert isinstance(channel.exception(), RuntimeError)
    assert sent == ["sent"]
