"""The agent against a real websockets server: hung host metrics, bounded reconnect delays."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from websockets.asyncio.server import ServerConnection

from gurutunnel_agent.client import AgentClient
from gurutunnel_agent.config import AgentSettings
from gurutunnel_protocol import CloseCode
from gurutunnel_protocol.messages import Heartbeat, HostMetrics, Reconnect
from tests.integration.agent.conftest import RunningAgent
from tests.integration.agent.fake_gateway import FakeGateway

StartAgent = Callable[..., RunningAgent]

COLLECTED = HostMetrics(
    hostname="collected-once",
    os="Linux",
    cpu_percent=5.0,
    cpu_count=4,
    mem_total_bytes=1 << 30,
    mem_used_percent=50.0,
    disk_total_bytes=1 << 35,
    disk_used_percent=30.0,
    boot_time=datetime(2024, 1, 1, tzinfo=UTC),
)


class HungCollector:
    """Returns ``COLLECTED`` for the first ``quick_calls`` calls, then blocks until released."""

    def __init__(self, quick_calls: int) -> None:
        self.quick_calls = quick_calls
        self.calls = 0
        self.release = threading.Event()

    def __call__(self) -> HostMetrics:
        self.calls += 1
        if self.calls > self.quick_calls:
            self.release.wait(timeout=30)  # bounded: the test releases it at teardown
        return COLLECTED


@pytest.fixture
async def hung_agents(
    make_settings: Callable[..., AgentSettings],
) -> AsyncIterator[Callable[[HungCollector], RunningAgent]]:
    agents: list[tuple[RunningAgent, HungCollector]] = []

    def start(collector: HungCollector) -> RunningAgent:
        client = AgentClient(make_settings(metrics_timeout_s=0.2), metrics=collector)
        agent = RunningAgent(client)
        agents.append((agent, collector))
        return agent

    yield start
    for agent, collector in agents:
        collector.release.set()
        if not agent.task.done():
            await agent.stop()


async def beats_on(gateway: FakeGateway, ws: ServerConnection, count: int) -> list[Heartbeat]:
    """The next ``count`` heartbeats received on ``ws`` (others skipped; bounded)."""
    beats: list[Heartbeat] = []
    while len(beats) < count:
        conn, beat = await gateway.next_frame(Heartbeat, timeout_s=3)
        if conn is ws:
            beats.append(beat)
    return beats


async def test_heartbeats_flow_with_last_metrics_across_reconnect_while_metrics_hang(
    gateway: FakeGateway, hung_agents: Callable[[HungCollector], RunningAgent]
) -> None:
    """A hung collection is started once; beats go on with the last metrics, also reconnected."""
    collector = HungCollector(quick_calls=1)
    hung_agents(collector)
    first = await gateway.next_connection()
    beats = await beats_on(gateway, first, 5)  # 0.1 s interval: several ticks during the hang
    assert all(beat.metrics == COLLECTED for beat in beats)
    first.transport.abort()
    second = await gateway.next_connection()
    beats = await beats_on(gateway, second, 3)
    assert all(beat.metrics == COLLECTED for beat in beats)
    assert collector.calls == 2  # the hung second call is reused, never duplicated


async def test_heartbeats_carry_minimal_metrics_until_the_first_collection_finishes(
    gateway: FakeGateway, hung_agents: Callable[[HungCollector], RunningAgent]
) -> None:
    """With no metrics ever collected, beats carry a minimal snapshot; then the real ones."""
    collector = HungCollector(quick_calls=0)
    hung_agents(collector)
    ws = await gateway.next_connection()
    beats = await beats_on(gateway, ws, 3)
    assert all(beat.metrics.disk_total_bytes == 0 for beat in beats)
    assert all(beat.metrics.hostname for beat in beats)
    assert collector.calls == 1
    collector.release.set()
    async with asyncio.timeout(3):
        while (await beats_on(gateway, ws, 1))[0].metrics != COLLECTED:
            pass


async def test_reconnect_delay_is_capped_at_backoff_max(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """reconnect{delay_ms} of hours waits at most backoff_max_s (plus jitter) before redialling."""
    start_agent(backoff_initial_s=0.01, backoff_max_s=0.3, backoff_jitter=False)
    ws = await gateway.next_connection()
    await gateway.next_frame(Heartbeat)
    await gateway.send(ws, Reconnect(delay_ms=10 * 3600 * 1000, reason="draining"))
    _, code, ended_at = await gateway.next_end()
    assert code == CloseCode.NORMAL
    second = await gateway.next_connection(timeout_s=3)
    elapsed = asyncio.get_running_loop().time() - ended_at
    assert second is not ws
    assert 0.25 <= elapsed < 1.5


async def test_repeated_reconnect_zero_still_backs_off(
    gateway: FakeGateway, start_agent: StartAgent
) -> None:
    """A gateway that accepts then says reconnect{0} again and again gets growing delays."""
    start_agent(
        backoff_initial_s=0.1,
        backoff_max_s=2.0,
        backoff_factor=2.0,
        backoff_jitter=False,
        backoff_reset_after_s=60.0,
    )
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    ws = await gateway.next_connection()
    for _ in range(3):
        await gateway.send(ws, Reconnect(delay_ms=0, reason="draining"))
        _, _, ended_at = await gateway.next_end()
        ws = await gateway.next_connection(timeout_s=3)
        gaps.append(loop.time() - ended_at)
    # backoff without jitter: 0.1, 0.2, 0.4 s
    assert gaps[0] >= 0.09
    assert gaps[1] >= 0.18
    assert gaps[2] >= 0.36
