"""The gateway bus delivers subscriptions without a task per subscription (real NATS).

``NatsBus.subscribe`` uses ``_Client.subscribe_dispatched`` and ``_Inbox`` (bus.py), which
lean on private parts of nats-py 2.16: these tests fail if nats-py changes under them (the read
loop no longer handing messages to ``_pending_queue.put_nowait``, its byte accounting,
``unsubscribe``/``drain``/``close`` no longer going through ``_wait_for_msgs_task`` and
``join``, a reconnect no longer replaying the subscription).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS

from gurutunnel_gateway import bus as bus_module
from gurutunnel_gateway.bus import BusTimeout, BusUnavailable, MessageHandler, NatsBus
from gurutunnel_protocol import Subjects, new_id

from .conftest import gateway_settings

Key = tuple[Ed25519PrivateKey, str]
TIMEOUT_S = 5.0


@pytest.fixture
async def bus(
    nats_url: str, subject_prefix: str, subjects: Subjects, agent_key: Key
) -> AsyncIterator[NatsBus]:
    settings = gateway_settings(nats_url, subject_prefix, agent_key[1], nats_reconnect_wait_s=0.05)
    bus = NatsBus(settings, subjects)
    await bus.connect()
    yield bus
    await bus.close()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    """Yield to the loop until ``condition`` holds (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        await asyncio.sleep(0.001)


def dispatch_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "nats-dispatch"]


def recorder(into: list[bytes], gate: asyncio.Event | None = None) -> MessageHandler:
    """A handler that appends each payload, waiting for ``gate`` (if any) after the first."""

    async def handler(payload: bytes, reply: str | None) -> None:
        into.append(payload)
        if gate is not None:
            await gate.wait()

    return handler


async def test_idle_subscriptions_hold_no_task_and_each_gets_its_messages_in_order(
    bus: NatsBus, nc: NATS, subject_prefix: str
) -> None:
    """50 subscriptions add no task; 20 messages each arrive in order, then no task is left."""
    before = len(asyncio.all_tasks())
    received: dict[str, list[bytes]] = {}
    for i in range(50):
        subject = f"{subject_prefix}.dispatch.{i}"
        received[subject] = []
        await bus.subscribe(subject, recorder(received[subject]))
    assert len(asyncio.all_tasks()) == before
    for n in range(20):
        for subject in received:
            await nc.publish(subject, str(n).encode())
    await nc.flush()
    await until(lambda: all(len(got) == 20 for got in received.values()), "all delivered")
    for got in received.values():
        assert got == [str(n).encode() for n in range(20)]
    await until(lambda: not dispatch_tasks(), "delivery tasks ended")
    assert len(asyncio.all_tasks()) == before


async def test_a_blocked_handler_holds_back_only_its_own_subscription(
    bus: NatsBus, nc: NATS, subject_prefix: str
) -> None:
    """A handler that waits delays the next messages of its subscription, not the others'."""
    gate = asyncio.Event()
    slow: list[bytes] = []
    fast: list[bytes] = []
    await bus.subscribe(f"{subject_prefix}.slow", recorder(slow, gate))
    await bus.subscribe(f"{subject_prefix}.fast", recorder(fast))
    for n in range(3):
        await nc.publish(f"{subject_prefix}.slow", str(n).encode())
        await nc.publish(f"{subject_prefix}.fast", str(n).encode())
    await nc.flush()
    await until(lambda: len(fast) == 3, "the other subscription's messages")
    assert slow == [b"0"]
    gate.set()
    await until(lambda: len(slow) == 3, "the held messages")
    assert slow == [b"0", b"1", b"2"]


async def test_handler_failure_is_logged_and_delivery_goes_on(
    bus: NatsBus, nc: NATS, subject_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that raises (or meets a stray cancellation) is logged; the next message is
    still delivered."""
    got: list[bytes] = []
    stray = asyncio.get_running_loop().create_future()
    stray.cancel()

    async def handler(payload: bytes, reply: str | None) -> None:
        got.append(payload)
        if payload == b"boom":
            raise RuntimeError("a handler bug")
        if payload == b"stray":
            await stray  # a future someone else cancelled: CancelledError, not ours

    subject = f"{subject_prefix}.failing"
    await bus.subscribe(subject, handler)
    with caplog.at_level(logging.ERROR, logger="gurutunnel_gateway.bus"):
        for payload in (b"boom", b"stray", b"after"):
            await nc.publish(subject, payload)
        await nc.flush()
        await until(lambda: got[-1:] == [b"after"], "the message after the failures")
    assert got == [b"boom", b"stray", b"after"]
    messages = [r.getMessage() for r in caplog.records]
    assert "bus handler failed" in messages
    assert "bus handler was cancelled" in messages


async def test_unsubscribe_cancels_the_running_handler_and_stops_delivery(
    bus: NatsBus, nc: NATS, subject_prefix: str
) -> None:
    """As with nats-py's own task: the handler running is cancelled, waiting messages and later
    ones are not delivered."""
    started = asyncio.Event()
    cancelled = asyncio.Event()
    got: list[bytes] = []

    async def handler(payload: bytes, reply: str | None) -> None:
        got.append(payload)
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    subject = f"{subject_prefix}.gone"
    sub = await bus.subscribe(subject, handler)
    await nc.publish(subject, b"0")
    await nc.publish(subject, b"1")  # waits behind the running handler
    await nc.flush()
    await asyncio.wait_for(started.wait(), TIMEOUT_S)
    await sub.unsubscribe()
    await asyncio.wait_for(cancelled.wait(), TIMEOUT_S)
    probe: list[bytes] = []
    await bus.subscribe(f"{subject_prefix}.probe", recorder(probe))
    await nc.publish(subject, b"2")
    await nc.publish(f"{subject_prefix}.probe", b"p")  # delivered after "2" would have been
    await nc.flush()
    await until(lambda: probe == [b"p"], "the probe")
    await until(lambda: not dispatch_tasks(), "delivery tasks ended")
    assert got == [b"0"]


async def test_slow_consumer_drops_messages_past_the_pending_limit(
    bus: NatsBus,
    nc: NATS,
    subject_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With two messages waiting behind a busy handler, more are dropped and reported."""
    monkeypatch.setattr(bus_module, "SUB_PENDING_MSGS_LIMIT", 2)
    gate = asyncio.Event()
    got: list[bytes] = []
    subject = f"{subject_prefix}.slow-consumer"
    await bus.subscribe(subject, recorder(got, gate))
    await nc.publish(subject, b"0")
    await nc.flush()
    await until(lambda: got == [b"0"], "the first message in its handler")
    with caplog.at_level(logging.WARNING, logger="gurutunnel_gateway.bus"):
        for n in range(1, 5):
            await nc.publish(subject, str(n).encode())
        await nc.flush()
        await until(
            lambda: (
                [r.getMessage() for r in caplog.records].count("nats error: SlowConsumerError") == 2
            ),
            "two slow-consumer reports",
        )
    gate.set()
    await until(lambda: len(got) == 3, "the waiting messages")
    await until(lambda: not dispatch_tasks(), "delivery tasks ended")
    assert got == [b"0", b"1", b"2"]


async def test_delivered_bytes_are_no_longer_counted_as_pending(
    bus: NatsBus, nc: NATS, subject_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a 100-byte pending budget, ten 30-byte messages handled one after the other all
    arrive: a handled message gives its bytes back."""
    monkeypatch.setattr(bus_module, "SUB_PENDING_BYTES_LIMIT", 100)
    got: list[bytes] = []
    sent: list[bytes] = []
    subject = f"{subject_prefix}.bytes"
    await bus.subscribe(subject, recorder(got))
    for n in range(10):
        sent.append(f"{n:030d}".encode())
        await nc.publish(subject, sent[-1])
        await nc.flush()
        await until(lambda: len(got) == len(sent), f"message {n}")
    assert got == sent


async def test_close_drains_messages_waiting_for_their_handler(
    bus: NatsBus, nc: NATS, subject_prefix: str
) -> None:
    """``close`` drains: messages already received are handled before the connection closes."""
    gate = asyncio.Event()
    got: list[bytes] = []
    subject = f"{subject_prefix}.drain"
    await bus.subscribe(subject, recorder(got, gate))
    for n in range(3):
        await nc.publish(subject, str(n).encode())
    await nc.flush()
    await until(lambda: got == [b"0"], "the first message in its handler")
    await until(lambda: _waiting(bus) == 2, "two messages waiting")
    closing = asyncio.create_task(bus.close())
    await until(lambda: bool(bus._nc.is_draining), "the drain started")
    assert not closing.done()  # waits for the handler
    gate.set()
    await asyncio.wait_for(closing, TIMEOUT_S)
    assert got == [b"0", b"1", b"2"]


def _waiting(bus: NatsBus) -> int:
    return sum(sub.pending_msgs for sub in bus._nc._subs.values())


async def test_subscription_is_replayed_after_a_reconnect(
    bus: NatsBus, nc: NATS, subject_prefix: str
) -> None:
    """After the client reconnects, the subscription still delivers."""
    got: list[bytes] = []
    subject = f"{subject_prefix}.reconnect"
    await bus.subscribe(subject, recorder(got))
    reconnects = bus._nc.stats["reconnects"]
    await bus._nc.force_reconnect()
    await until(lambda: bus.connected and bus._nc.stats["reconnects"] > reconnects, "reconnected")
    await bus._nc.flush(timeout=TIMEOUT_S)  # the replayed SUB is on the server
    await nc.publish(subject, b"after")
    await nc.flush()
    await until(lambda: got == [b"after"], "the message after the reconnect")


@pytest.mark.parametrize("bad", ["", "a b", "a\r\nPUB x 1", "a..b", "a.>.b", "a.b*"])
async def test_subjects_nats_refuses_are_refused(bus: NatsBus, bad: str) -> None:
    """What nats-py's own subscribe refuses (a CR LF would inject protocol) is refused."""
    with pytest.raises(BusUnavailable):
        await bus.subscribe(bad, recorder([]))


async def test_wildcard_subscription_gets_the_messages_of_every_match(
    bus: NatsBus, nc: NATS, subject_prefix: str
) -> None:
    """``*`` and ``>`` subscribe as with nats-py's subscribe."""
    star: list[bytes] = []
    tail: list[bytes] = []
    await bus.subscribe(f"{subject_prefix}.wild.*", recorder(star))
    await bus.subscribe(f"{subject_prefix}.wild.>", recorder(tail))
    await nc.publish(f"{subject_prefix}.wild.a", b"a")
    await nc.publish(f"{subject_prefix}.wild.b.c", b"b.c")
    await nc.flush()
    await until(lambda: (len(star), len(tail)) == (1, 2), "every match")
    assert (star, tail) == ([b"a"], [b"a", b"b.c"])


async def test_a_subscription_whose_round_trip_fails_is_not_left_behind(
    bus: NatsBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """subscribe raises when the server never confirms the interest, and the subscription it
    made is gone too: no handler is left to answer for a connection that never started."""

    async def no_round_trip() -> None:
        raise BusTimeout("no flush round trip")

    before = set(bus._nc._subs)
    monkeypatch.setattr(bus, "_subscriptions_flushed", no_round_trip)
    with pytest.raises(BusTimeout):
        await bus.subscribe(f"test.stale.{new_id()}", recorder([]))
    assert set(bus._nc._subs) == before
