"""Gateway leases end to end (close path 2): real API, gateway and agent processes.

A gateway killed with SIGKILL publishes no disconnect: only its lease can close its sessions.
A gateway frozen with SIGSTOP past its lease wakes up fenced: its sessions stay closed, it drops
its agents, and they reconnect under its new boot.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.processes import ManagedProcess
from devstack.stack import EnrolledAgent, Stack, StackConfig
from tests.e2e.conftest import E2E_AGENT_ENV, E2E_API_ENV, _create_db, _drop_db, api_client

pytestmark = pytest.mark.slow

TTL_S = 1.5
REAP_S = 0.2
LEASE_API_ENV = {
    **E2E_API_ENV,
    "GT_API_LEASE_REAP_INTERVAL_S": str(REAP_S),
    "GT_API_LEASE_UNKNOWN_GRACE_S": "3",
}
LEASE_GATEWAY_ENV = {
    "GT_GATEWAY_PING_INTERVAL_S": "1",
    "GT_GATEWAY_PING_TIMEOUT_S": "1",
    "GT_GATEWAY_HEARTBEAT_INTERVAL_S": "0.3",
    "GT_GATEWAY_HEARTBEAT_TIMEOUT_S": "0.3",
    "GT_GATEWAY_LEASE_TTL_S": str(TTL_S),
    "GT_GATEWAY_RECONNECT_JITTER_MAX_S": "0.3",
}
CLOSE_BOUND_S = TTL_S + REAP_S + 1.0


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def lease_stack(
    request: pytest.FixtureRequest, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """An API with a fast lease reaper on this module's own database and subject prefix;
    each test starts (and kills) gateways of its own."""
    root: Path = tmp_path_factory.mktemp(f"lease-stack-{request.param}")
    database_url: str | None = None
    db_name = server = ""
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        db_name = f"gt_e2e_{secrets.token_hex(6)}"
        asyncio.run(_create_db(server, db_name))
        base = server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        database_url = f"{base}/{db_name}"
    s = Stack(
        StackConfig(
            root=root,
            nats_url=nats_url,
            database_url=database_url,
            subject_prefix=f"e{secrets.token_hex(4)}.gt",
            api_env=LEASE_API_ENV,
            gateway_env=LEASE_GATEWAY_ENV,
            agent_env=E2E_AGENT_ENV,
        )
    )
    try:
        s.start_api()
        yield s
    finally:
        s.close()
        if db_name:
            asyncio.run(_drop_db(server, db_name))


@pytest.fixture(scope="module")
def admin_token(lease_stack: Stack) -> str:
    username = f"admin{secrets.token_hex(3)}"
    return lease_stack.token(username, lease_stack.create_admin(username))


@pytest.fixture
async def client(lease_stack: Stack, admin_token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(lease_stack, admin_token, timeout_s=30) as c:
        yield c


@dataclass
class AgentOnGateway:
    agent: EnrolledAgent
    gateway: ManagedProcess
    process: ManagedProcess


@pytest.fixture
async def agent_on_own_gateway(
    lease_stack: Stack, client: httpx.AsyncClient
) -> AsyncIterator[AgentOnGateway]:
    """A gateway process of this test and a real agent process online through it."""
    gateway_id = f"gw{secrets.token_hex(3)}"
    gateway, _ = lease_stack.start_gateway(gateway_id=gateway_id)
    index = len(lease_stack.gateways) - 1
    r = await client.post("/agents", json={"name": f"agent-{gateway_id}"})
    assert r.status_code == 201, r.text
    body = r.json()
    agent = EnrolledAgent(
        id=body["agent"]["id"], name=body["agent"]["name"], credential=body["credential"]
    )
    process = lease_stack.start_agent(agent, gateway_index=index)
    try:
        await wait_for(client, f"/agents/{agent.id}", lambda b: b["online"] is True, 15)
        yield AgentOnGateway(agent=agent, gateway=gateway, process=process)
    finally:
        process.stop()
        gateway.stop()


async def wait_for(
    client: httpx.AsyncClient, path: str, check: Any, timeout_s: float
) -> dict[str, Any]:
    """Poll ``GET path`` until ``check(body)``; the body (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = await client.get(path)
        if r.status_code == 200:
            body = r.json()
            if check(body):
                return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} not as expected within {timeout_s}s: {body}")


async def open_active(client: httpx.AsyncClient, agent_id: str) -> dict[str, Any]:
    r = await client.post("/tunnel/open", json={"agent_id": agent_id})
    assert r.status_code == 201, r.text
    session: dict[str, Any] = r.json()
    assert session["state"] == "active"
    return session


async def close_audit(client: httpx.AsyncClient, session_id: str) -> list[str | None]:
    rows = (await client.get("/audit", params={"session_id": session_id})).json()["data"]
    return [row["reason"] for row in rows if row["action"] == "session.close"]


def is_closed(body: dict[str, Any]) -> bool:
    return bool(body["state"] == "closed")


async def test_sigkilled_gateway_session_closes_gateway_lost_within_lease_bound(
    client: httpx.AsyncClient, agent_on_own_gateway: AgentOnGateway
) -> None:
    """SIGKILL of the gateway mid-session: closed gateway_lost within ttl + reap interval + 1 s,
    one close audit row, the agent offline."""
    agent = agent_on_own_gateway.agent
    session = await open_active(client, agent.id)

    agent_on_own_gateway.gateway.kill()
    killed = time.monotonic()
    body = await wait_for(client, f"/tunnel/status/{session['id']}", is_closed, CLOSE_BOUND_S)
    elapsed = time.monotonic() - killed
    assert body["close_reason"] == "gateway_lost"
    assert elapsed <= CLOSE_BOUND_S, f"closed {elapsed:.2f}s after SIGKILL"
    assert await close_audit(client, session["id"]) == ["gateway_lost"]
    await wait_for(client, f"/agents/{agent.id}", lambda b: b["online"] is False, 5)


async def test_sigkilled_gateway_agent_comes_back_through_the_other_gateway_and_opens_again(
    lease_stack: Stack, client: httpx.AsyncClient
) -> None:
    """Two gateways, the agent on the first with the second as its failover: SIGKILL of the
    first closes its session within the lease bound, the agent comes back online through the
    second, and a new open there answers 201. The session closes ``gateway_lost`` when the
    lease runs out first, or ``agent_disconnected`` when the agent's new connection reaches the
    API first (a newer connection closes the sessions of older ones): either way, not later."""
    first, _ = lease_stack.start_gateway(gateway_id=f"gw{secrets.token_hex(3)}")
    first_index = len(lease_stack.gateways) - 1
    second_id = f"gw{secrets.token_hex(3)}"
    second, _ = lease_stack.start_gateway(gateway_id=second_id)
    second_url = lease_stack.gateway_ws_url(len(lease_stack.gateways) - 1)
    r = await client.post("/agents", json={"name": f"agent-{second_id}"})
    assert r.status_code == 201, r.text
    body = r.json()
    agent = EnrolledAgent(
        id=body["agent"]["id"], name=body["agent"]["name"], credential=body["credential"]
    )
    process = lease_stack.start_agent(
        agent, gateway_index=first_index, GT_AGENT_GATEWAY_URLS=json.dumps([second_url])
    )
    try:
        await wait_for(client, f"/agents/{agent.id}", lambda b: b["online"] is True, 15)
        session = await open_active(client, agent.id)
        assert session["gateway_id"] != second_id

        first.kill()
        killed = time.monotonic()
        closed = await wait_for(client, f"/tunnel/status/{session['id']}", is_closed, CLOSE_BOUND_S)
        assert closed["close_reason"] in ("gateway_lost", "agent_disconnected")
        assert time.monotonic() - killed <= CLOSE_BOUND_S
        assert len(await close_audit(client, session["id"])) == 1

        await wait_for(
            client,
            f"/agents/{agent.id}",
            lambda b: b["online"] is True and b.get("gateway_id") == second_id,
            15,
        )
        again = await open_active(client, agent.id)
        assert again["gateway_id"] == second_id
    finally:
        process.stop()
        second.stop()
        first.stop()


@dataclass
class OpenSessionWatch:
    """Polls the agent's sessions: how many were pending/active at once, and any revival."""

    client: httpx.AsyncClient
    agent_id: str
    most_open: int = 0
    closed_seen: set[str] = field(default_factory=set)
    revived: set[str] = field(default_factory=set)
    polls: int = 0
    _task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        while True:
            r = await self.client.get("/tunnel/sessions", params={"agent_id": self.agent_id})
            if r.status_code == 200:
                data = r.json()["data"]
                live = [s["id"] for s in data if s["state"] in ("pending", "active")]
                self.most_open = max(self.most_open, len(live))
                self.revived |= self.closed_seen & set(live)
                self.closed_seen |= {s["id"] for s in data if s["state"] == "closed"}
                self.polls += 1
            await asyncio.sleep(0.03)

    async def two_more_polls(self) -> None:
        """Wait (bounded) until the watch looked twice more."""
        target, deadline = self.polls + 2, time.monotonic() + 5
        while self.polls < target:
            assert time.monotonic() < deadline, "the session watch stopped polling"
            await asyncio.sleep(0.01)

    def __enter__(self) -> OpenSessionWatch:
        self._task = asyncio.create_task(self._poll())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def test_sigstopped_gateway_wakes_fenced_and_no_session_is_revived(
    lease_stack: Stack, client: httpx.AsyncClient, agent_on_own_gateway: AgentOnGateway
) -> None:
    """SIGSTOP the gateway past its lease: the session closes gateway_lost; after SIGCONT it
    stays closed (one audit row), the agent never has two open sessions, it reconnects (the
    gateway dropped it with 4002 and beats as a new boot) and a new open succeeds."""
    agent, gateway = agent_on_own_gateway.agent, agent_on_own_gateway.gateway
    session = await open_active(client, agent.id)
    watch = OpenSessionWatch(client, agent.id)
    with watch:
        gateway.signal(signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            body = await wait_for(
                client, f"/tunnel/status/{session['id']}", is_closed, CLOSE_BOUND_S
            )
            assert body["close_reason"] == "gateway_lost"
            assert time.monotonic() - stopped <= CLOSE_BOUND_S
            await wait_for(client, f"/agents/{agent.id}", lambda b: b["online"] is False, 5)
        finally:
            gateway.signal(signal.SIGCONT)

        # the gateway fenced itself; the agent comes back through its new boot
        await wait_for(client, f"/agents/{agent.id}", lambda b: b["online"] is True, 15)
        again = await open_active(client, agent.id)
        assert again["gateway_id"] == session["gateway_id"]
        assert again["conn_id"] != session["conn_id"]
        await watch.two_more_polls()
    assert watch.most_open == 1
    assert not watch.revived
    body = (await client.get(f"/tunnel/status/{session['id']}")).json()
    assert (body["state"], body["close_reason"]) == ("closed", "gateway_lost")
    assert await close_audit(client, session["id"]) == ["gateway_lost"]
    assert "lease lost" in gateway.log_path.read_text(errors="replace")
