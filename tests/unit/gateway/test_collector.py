"""The gateway's full garbage collections: when they run, and what a deep one frees."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

from gurutunnel_gateway.collector import Collection, FullCollections


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """The collections freeze the test process's objects: give them back to the collector."""
    yield
    gc.unfreeze()


class _Node:
    """A reference cycle: only a collection that walks it can free it."""

    def __init__(self) -> None:
        self.me = self


def _collections(**kwargs: object) -> tuple[FullCollections, list[Collection]]:
    seen: list[Collection] = []
    options: dict[str, object] = {
        "interval_s": 1.0,
        "quiet_s": 0.0,
        "deep_every": 3,
        "last_arrival": lambda: None,
        "on_collection": seen.append,
        **kwargs,
    }
    return FullCollections(**options), seen  # type: ignore[arg-type]


def test_a_cycle_frozen_while_alive_is_freed_by_the_deep_collection_only() -> None:
    """A recent collection freezes its survivors; once garbage, they are not walked again
    until the deep one (every third here), which frees them."""
    collections, seen = _collections(deep_every=3)
    node = _Node()
    alive = weakref.ref(node)
    collections.collect()  # recent: the live cycle survives and is frozen
    del node
    collections.collect()  # recent: a frozen cycle is not walked
    assert alive() is not None
    collections.collect()  # deep: everything unfrozen first
    assert alive() is None
    assert [c.deep for c in seen] == [False, False, True]
    assert gc.get_freeze_count() > 0  # the survivors of the deep one are frozen again


def test_a_cycle_that_dies_young_is_freed_by_the_next_collection() -> None:
    """Garbage made since the last collection is freed by the next one, deep or not."""
    collections, seen = _collections(deep_every=3)
    node = _Node()
    alive = weakref.ref(node)
    del node
    collections.collect()
    assert alive() is None
    assert seen[0].deep is False and seen[0].collected >= 1


def test_after_a_quarter_of_the_sockets_ended_the_next_collection_is_deep() -> None:
    """Sockets that ended since the last deep collection (a mass reconnect) make the next one
    deep, long before deep_every: their cycles were frozen while they were alive."""
    sockets = {"ended": 0, "connected": 100}
    collections, seen = _collections(
        deep_every=12, sockets=lambda: (sockets["ended"], sockets["connected"])
    )
    collections.collect()
    sockets["ended"] = 26  # more than 100 // 4 since the start
    collections.collect()
    sockets["ended"] = 30  # 4 since the last deep one
    collections.collect()
    sockets["ended"] = 60
    collections.collect()
    assert [c.deep for c in seen] == [False, True, False, True]


class _Timed(FullCollections):
    """The loop's timing, without collecting the test process."""

    def __init__(self, started: float, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.started = started
        self.at: list[float] = []

    def collect(self) -> Collection:
        self.at.append(time.monotonic() - self.started)
        return Collection(deep=False, seconds=0.0, collected=0)


async def _collections_at(
    last_arrival: Callable[[], float | None],
    *,
    interval_s: float,
    quiet_s: float,
    count: int = 1,
    timed: type[_Timed] = _Timed,
) -> list[float]:
    """When the loop ran its first ``count`` collections (seconds after its start)."""
    loop = timed(
        time.monotonic(),
        interval_s=interval_s,
        quiet_s=quiet_s,
        last_arrival=last_arrival,
        on_collection=lambda _: None,
        deep_every=12,
    )
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(5):
            while len(loop.at) < count:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    return loop.at


async def _first_collection(
    last_arrival: Callable[[], float | None], *, interval_s: float, quiet_s: float
) -> float:
    at = await _collections_at(last_arrival, interval_s=interval_s, quiet_s=quiet_s)
    return at[0]


async def test_with_no_arrivals_it_collects_after_the_interval() -> None:
    at = await _first_collection(lambda: None, interval_s=0.3, quiet_s=0.2)
    assert 0.3 <= at < 0.55


async def test_it_waits_until_agents_stop_arriving() -> None:
    """Agents arriving until 1.3 s: the collection due at 1 s waits for 0.2 s of quiet."""
    started = time.monotonic()

    def last_arrival() -> float:
        return min(time.monotonic(), started + 1.3)

    at = await _first_collection(last_arrival, interval_s=1.0, quiet_s=0.2)
    assert 1.5 <= at < 1.95


async def test_while_agents_keep_arriving_it_collects_after_one_more_interval() -> None:
    """Never quiet: the collection still comes, one interval late, not never."""
    at = await _first_collection(time.monotonic, interval_s=0.3, quiet_s=0.2)
    assert 0.6 <= at < 0.9


async def test_a_failed_collection_does_not_end_the_loop() -> None:
    """CPython's own full collections are off: one failure must not stop them for good."""

    class _FailsOnce(_Timed):
        def collect(self) -> Collection:
            if not self.at:
                self.at.append(-1.0)
                raise RuntimeError("a bug in a callback")
            return super().collect()

    at = await _collections_at(lambda: None, interval_s=0.1, quiet_s=0.0, count=2, timed=_FailsOnce)
    assert at[0] == -1.0 and at[1] >= 0.2


def _in_a_fresh_process(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def test_install_freezes_start_up_and_turns_off_automatic_full_collections() -> None:
    code = (
        "import gc\n"
        "from gurutunnel_gateway import collector\n"
        "young, middle, _ = gc.get_threshold()\n"
        "collector.install(300.0)\n"
        "print(collector.installed(), gc.get_freeze_count() > 1000,\n"
        "      gc.get_threshold() == (young, middle, 2**31 - 1))\n"
    )
    assert _in_a_fresh_process(code) == "True True True"


def test_install_with_interval_0_changes_nothing() -> None:
    code = (
        "import gc\n"
        "from gurutunnel_gateway import collector\n"
        "before = gc.get_threshold()\n"
        "collector.install(0)\n"
        "print(collector.installed(), gc.get_freeze_count(), gc.get_threshold() == before)\n"
    )
    assert _in_a_fresh_process(code) == "False 0 True"


def test_install_on_a_collector_without_a_full_threshold_changes_nothing() -> None:
    """Where the third threshold does not stick (CPython 3.14's incremental collector), the
    gateway leaves the collector as it is and runs no loop."""
    code = (
        "import gc\n"
        "real = gc.set_threshold\n"
        "gc.set_threshold = lambda young, *rest: real(young, *rest[:1])\n"
        "from gurutunnel_gateway import collector\n"
        "before = gc.get_threshold()\n"
        "collector.install(300.0)\n"
        "print(collector.installed(), gc.get_freeze_count(), gc.get_threshold() == before)\n"
    )
    assert _in_a_fresh_process(code) == "False 0 True"
