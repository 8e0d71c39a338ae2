"""The agent with several gateway URLs against real WebSocket servers: failover in turn."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable

import pytest

from gurutunnel_protocol import CloseCode
from gurutunnel_protocol.messages import Heartbeat, Reconnect
from tests.integration.agent.conftest import RunningAgent
from tests.integration.agent.fake_gateway import FakeGateway


@pytest.fixture
async def other_gateway() -> AsyncIterator[FakeGateway]:
    gw = FakeGateway()
    await gw.start()
    yield gw
    await gw.stop()


def dead_url() -> str:
    """A URL on a port nothing listens on (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"ws://127.0.0.1:{port}/agent/v1/connect"


async def test_unreachable_first_url_fails_over_to_the_next(
    gateway: FakeGateway, start_agent: Callable[..., RunningAgent]
) -> None:
    """gateway_url refuses connections: the agent connects to the next URL of its list."""
    agent = start_agent(gateway_url=dead_url(), gateway_urls=[gateway.url])
    await gateway.next_connection()
    await gateway.next_frame(Heartbeat)
    assert agent.client.gateway_url == gateway.url


async def test_refused_upgrade_fails_over_and_wraps_around(
    gateway: FakeGateway,
    other_gateway: FakeGateway,
    start_agent: Callable[..., RunningAgent],
) -> None:
    """A gateway answering 503 (draining) is skipped; the list wraps back to the first URL."""
    gateway.refuse_status = 503
    start_agent(gateway_url=other_gateway.url, gateway_urls=[gateway.url])
    first = await other_gateway.next_connection()
    await other_gateway.send(first, Reconnect(delay_ms=0, reason="draining"))
    assert (await other_gateway.next_end())[1] == CloseCode.NORMAL
    # next in turn is `gateway` (503), then back to `other_gateway`
    second = await other_gateway.next_connection()
    assert second is not first
    assert len(gateway.auth_headers) >= 1


async def test_reconnect_frame_sends_the_agent_to_the_next_gateway(
    gateway: FakeGateway,
    other_gateway: FakeGateway,
    start_agent: Callable[..., RunningAgent],
) -> None:
    """A drained gateway (reconnect frame) is left for the next URL; a plain drop is not."""
    agent = start_agent(gateway_urls=[other_gateway.url])
    ws = await gateway.next_connection()
    await gateway.next_frame(Heartbeat)
    await ws.close(CloseCode.INTERNAL_ERROR, "blip")  # a working connection dropped: same URL
    ws = await gateway.next_connection()
    await gateway.next_frame(Heartbeat)
    await gateway.send(ws, Reconnect(delay_ms=50, reason="draining"))
    moved = await other_gateway.next_connection()
    await other_gateway.next_frame(Heartbeat)
    assert agent.client.gateway_url == other_gateway.url
    assert moved in other_gateway.connections
    assert len(gateway.connections) == 2
