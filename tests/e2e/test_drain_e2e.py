"""Gateway drain end to end: two gateway processes, a real agent with both URLs, SIGTERM one.

The agent (``gurutunnel-agent`` process) starts on gateway A with gateway B as its failover
URL and holds an open session. SIGTERM on A: the session closes ``gateway_shutdown``, A exits
within its drain bound, the agent comes back on B, and a new session opens there.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from devstack.stack import EnrolledAgent, Stack, StackConfig
from tests.e2e.conftest import (
    E2E_AGENT_ENV,
    E2E_API_ENV,
    E2E_GATEWAY_ENV,
    api_client,
    new_admin_token,
)

pytestmark = pytest.mark.slow

DRAIN_TIMEOUT_S = 5.0
EXIT_MARGIN_S = 3.0
"""Process teardown after the drain (bus flush, interpreter exit)."""


@pytest.fixture(scope="module")
def two_gateways(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API (SQLite) and gateways gw-a and gw-b of their own, on this module's subject prefix."""
    config = StackConfig(
        root=tmp_path_factory.mktemp("stack-drain"),
        nats_url=nats_url,
        subject_prefix=f"e{secrets.token_hex(4)}.gt",
        api_env=E2E_API_ENV,
        gateway_env={
            **E2E_GATEWAY_ENV,
            "GT_GATEWAY_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
            "GT_GATEWAY_RECONNECT_JITTER_MAX_S": "0.5",
        },
        agent_env={**E2E_AGENT_ENV, "GT_AGENT_RECONNECT_JITTER_S": "0.2"},
    )
    stack = Stack(config)
    try:
        stack.start_api()
        stack.start_gateway("gw-a")
        stack.start_gateway("gw-b")
        yield stack
    finally:
        stack.close()


@pytest.fixture
async def admin_client(two_gateways: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(two_gateways, new_admin_token(two_gateways), timeout_s=30) as client:
        yield client


async def _agent_on(
    client: httpx.AsyncClient, agent_id: str, gateway_id: str, timeout_s: float = 15
) -> None:
    """Bounded wait until the API sees the agent online on ``gateway_id``."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = (await client.get(f"/agents/{agent_id}")).json()
        if body.get("online") is True and body.get("gateway_id") == gateway_id:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"agent not online on {gateway_id} within {timeout_s}s: {body}")


async def _closed(client: httpx.AsyncClient, session_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = (await client.get(f"/tunnel/status/{session_id}")).json()
        if body["state"] == "closed":
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"session not closed within {timeout_s}s: {body}")


async def test_sigterm_drains_gateway_shutdown_and_agent_moves_to_the_other_gateway(
    two_gateways: Stack, admin_client: httpx.AsyncClient
) -> None:
    """SIGTERM on the agent's gateway: session closed gateway_shutdown (one audit row), the
    gateway exits 0 within its drain bound, the agent reconnects to its failover URL and a new
    session opens there."""
    stack = two_gateways
    r = await admin_client.post("/agents", json={"name": f"drain-{secrets.token_hex(3)}"})
    assert r.status_code == 201, r.text
    body = r.json()
    agent = EnrolledAgent(
        id=body["agent"]["id"], name=body["agent"]["name"], credential=body["credential"]
    )
    agent_id = agent.id
    proc = stack.start_agent(
        agent, gateway_index=0, GT_AGENT_GATEWAY_URLS=json.dumps([stack.gateway_ws_url(1)])
    )
    try:
        await _agent_on(admin_client, agent_id, "gw-a")
        r = await admin_client.post("/tunnel/open", json={"agent_id": agent_id})
        assert r.status_code == 201, r.text
        first = r.json()
        assert first["gateway_id"] == "gw-a"

        gateway_a = stack.gateways[0][0]
        gateway_a.signal(signal.SIGTERM)
        signalled = time.monotonic()
        closed = await _closed(admin_client, first["id"], DRAIN_TIMEOUT_S + EXIT_MARGIN_S)
        assert closed["close_reason"] == "gateway_shutdown"
        while gateway_a.alive():
            assert time.monotonic() - signalled < DRAIN_TIMEOUT_S + EXIT_MARGIN_S, (
                "gateway did not exit within its drain bound"
            )
            await asyncio.sleep(0.05)
        assert gateway_a.proc is not None and gateway_a.proc.returncode == 0

        rows = (await admin_client.get("/audit", params={"session_id": first["id"]})).json()
        closes = [row for row in rows["data"] if row["action"] == "session.close"]
        assert [row["reason"] for row in closes] == ["gateway_shutdown"]

        await _agent_on(admin_client, agent_id, "gw-b")
        r = await admin_client.post("/tunnel/open", json={"agent_id": agent_id})
        assert r.status_code == 201, r.text
        second = r.json()
        assert second["gateway_id"] == "gw-b" and second["conn_id"] != first["conn_id"]
        r = await admin_client.post("/tunnel/close", json={"session_id": second["id"]})
        assert r.status_code == 200 and r.json()["close_reason"] == "user"
    finally:
        proc.stop()
