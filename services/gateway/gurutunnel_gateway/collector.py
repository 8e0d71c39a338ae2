"""When the gateway process collects cyclic garbage: full collections at quiet moments.

Why: CPython runs a full collection whenever the objects promoted to its oldest generation grew
by a quarter since the last one, and a full collection walks every tracked object, each socket's
included, with the event loop stopped. A replica filling up with agents (a reconnect storm into
a fresh replica) meets one full collection after another: 16 of 0.4 to 0.8 s each while 10,000
agents came back, 7 s of a 30 s storm, every command to the agents already back waiting each
time. A gateway's own objects are long-lived (a socket lives for days) and hardly ever cyclic
garbage, so the gateway decides when full collections run.

Contract:
- :func:`install` (the process entry point only: the collector's thresholds are process-wide,
  and the test suite runs many gateways in one process; :func:`installed` tells) collects once,
  freezes what start-up built (modules, schemas, settings: never garbage) so that no later
  collection walks it, and turns off CPython's automatic full collections. Young and middle
  generations are still collected by CPython at its own thresholds (short-lived cycles die
  there). That process-wide part alone is :func:`stop_automatic_full_collections`.
- :class:`FullCollections` (a gateway loop, ``run``, started only where :func:`installed`):
  every ``gc_full_interval_s`` it runs a full collection at a quiet moment: no agent socket set
  up for ``gc_quiet_s``. While agents keep arriving it waits, at most one more interval, then
  collects anyway (garbage stays bounded). The survivors are then frozen too, so the next
  collection walks only what came since: a collection costs what the last interval allocated,
  not what the gateway holds. A deep collection first unfreezes everything: a socket that ended
  in a reference cycle after it was frozen (a closed connection leaves some) is freed then. It
  is every ``gc_deep_every``-th collection, and the next one as soon as more sockets ended since
  the last deep one than a quarter of those connected: a mass reconnect does not leave the old
  sockets' memory held for ``gc_deep_every`` intervals.
- ``gc_full_interval_s = 0``, or a Python whose collector has no full-collection threshold
  (CPython 3.14's incremental one): :func:`install` changes nothing and the loop does not run.
- A failed collection (a bug in a callback) is logged and the loop goes on.
- Each collection is counted in ``GatewayMetrics`` (kind ``recent`` or ``deep``, seconds).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# gen2 is collected when its count (middle-generation collections since the last full one)
# exceeds this: never, in practice
_NO_AUTOMATIC_FULL = 2**31 - 1
_installed = False


def installed() -> bool:
    """:func:`install` took over this process's full collections."""
    return _installed


def install(full_interval_s: float) -> None:
    """Process-wide set-up (see the module contract); a no-op when ``full_interval_s`` is 0."""
    global _installed
    if full_interval_s <= 0:
        return
    if not stop_automatic_full_collections():
        log.info("garbage collector left as it is: this Python has no full-collection threshold")
        return
    _installed = True
    log.info("garbage collector: full collections at quiet moments, start-up frozen")


def stop_automatic_full_collections() -> bool:
    """Collect once, freeze what exists and turn CPython's automatic full collections off, for
    this whole process; False (nothing changed) where the collector has no full-collection
    threshold (CPython 3.14's incremental one, whose pauses are short anyway). Also for a
    process that lives for one job and needs no full collection at all (bench's simulated
    agents)."""
    young, middle, oldest = gc.get_threshold()
    gc.set_threshold(young, middle, _NO_AUTOMATIC_FULL)
    if gc.get_threshold()[2] != _NO_AUTOMATIC_FULL:
        gc.set_threshold(young, middle, oldest)
        return False
    gc.collect()
    gc.freeze()
    return True


@dataclass
class Collection:
    """One collection the loop ran."""

    deep: bool
    seconds: float
    collected: int


class FullCollections:
    """The loop that runs the full collections (see the module contract)."""

    def __init__(
        self,
        *,
        interval_s: float,
        quiet_s: float,
        deep_every: int,
        last_arrival: Callable[[], float | None],
        on_collection: Callable[[Collection], None],
        sockets: Callable[[], tuple[int, int]] = lambda: (0, 0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._quiet_s = quiet_s
        self._deep_every = deep_every
        self._last_arrival = last_arrival
        self._on_collection = on_collection
        self._clock = clock
        self._sockets = sockets
        """(agent sockets ended so far, agent sockets connected now)."""
        self._since_deep = 0
        """Collections since the last deep one."""
        self._ended_at_deep = 0

    def _quiet_in_s(self) -> float:
        """Seconds until no agent socket was set up for ``quiet_s`` (0 or less: quiet now)."""
        last = self._last_arrival()
        return 0.0 if last is None else last + self._quiet_s - self._clock()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            deadline = self._clock() + self._interval_s
            while True:
                # until the last arrival is quiet_s old (a newer one moves it), or the deadline
                wait_s = min(self._quiet_in_s(), deadline - self._clock())
                if wait_s <= 0:
                    break
                await asyncio.sleep(wait_s)
            try:
                self.collect()
            except Exception:
                # CPython's own full collections are off: this loop must go on whatever happens
                log.exception("full garbage collection failed; the next one is due as usual")

    def collect(self) -> Collection:
        """One full collection now (deep or not: see the module contract), survivors frozen."""
        self._since_deep += 1
        ended, connected = self._sockets()
        deep = self._since_deep >= self._deep_every or ended - self._ended_at_deep > connected // 4
        started = time.perf_counter()
        if deep:
            self._since_deep, self._ended_at_deep = 0, ended
            gc.unfreeze()
        collected = gc.collect()
        gc.freeze()
        done = Collection(deep=deep, seconds=time.perf_counter() - started, collected=collected)
        log.info(
            "full garbage collection",
            extra={"deep": deep, "seconds": round(done.seconds, 4), "collected": collected},
        )
        self._on_collection(done)
        return done
