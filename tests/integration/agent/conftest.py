"""Fixtures for the agent's integration tests: a fake gateway and fast agent settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gurutunnel_agent.client import AgentClient
from gurutunnel_agent.config import AgentSettings
from gurutunnel_protocol.messages import TunnelOpen, TunnelReady
from tests.integration.agent.fake_gateway import GOOD_CREDENTIAL, FakeGateway
from tests.integration.agent.tunnel_harness import SESSION, Tunnel

FAST: dict[str, Any] = {
    "heartbeat_interval_s": 30.0,  # the fake gateway's welcome asks for 0.1 s
    "ping_interval_s": 1.0,
    "ping_timeout_s": 1.0,
    "open_timeout_s": 2.0,
    "welcome_timeout_s": 2.0,
    "close_timeout_s": 1.0,
    "send_timeout_s": 2.0,
    "backoff_initial_s": 0.05,
    "backoff_max_s": 0.2,
    "backoff_reset_after_s": 0.0,
    "reconnect_jitter_s": 0.0,
}


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    gw = FakeGateway()
    await gw.start()
    yield gw
    await gw.stop()


@pytest.fixture
def make_settings(gateway: FakeGateway) -> Callable[..., AgentSettings]:
    def make(**overrides: Any) -> AgentSettings:
        values: dict[str, Any] = {
            "gateway_url": gateway.url,
            "credential": GOOD_CREDENTIAL,
            **FAST,
            **overrides,
        }
        return AgentSettings(**values)

    return make


class RunningAgent:
    def __init__(self, client: AgentClient) -> None:
        self.client = client
        self.task: asyncio.Task[None] = asyncio.create_task(client.run())

    async def stop(self, timeout_s: float = 5.0) -> None:
        self.client.stop()
        await asyncio.wait_for(self.task, timeout_s)


@pytest.fixture
async def start_agent(
    make_settings: Callable[..., AgentSettings],
) -> AsyncIterator[Callable[..., RunningAgent]]:
    agents: list[RunningAgent] = []

    def start(**overrides: Any) -> RunningAgent:
        agent = RunningAgent(AgentClient(make_settings(**overrides)))
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        if not agent.task.done():
            await agent.stop()
        elif not agent.task.cancelled():
            agent.task.exception()  # retrieved so a failure is not reported as unawaited


@pytest.fixture
def open_tunnel(
    gateway: FakeGateway, start_agent: Callable[..., RunningAgent], tmp_path: Path
) -> Callable[..., Awaitable[Tunnel]]:
    """Start an agent (cwd allowlist: ``tmp_path``, short kill grace) and open session s1."""

    async def open_(**overrides: Any) -> Tunnel:
        agent = start_agent(**{"cwd_allowlist": [tmp_path], "kill_grace_s": 0.5, **overrides})
        ws = await gateway.next_connection()
        await gateway.send(ws, TunnelOpen(req_id="open", session_id=SESSION, tech_id="t1"))
        await gateway.next_frame(TunnelReady)
        return Tunnel(gateway, ws, agent, tmp_path)

    return open_
