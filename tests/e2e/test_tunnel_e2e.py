"""Tunnel sessions end to end: technician REST -> API -> NATS -> gateway -> agent, and back.

Every part is a real process (uvicorn API, gateway, agent) on real NATS, on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from devstack.processes import ManagedProcess
from devstack.stack import EnrolledAgent, Stack
from tests.e2e.agents import scripted_agent
from tests.e2e.conftest import api_client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def admin(stack: Stack) -> tuple[str, str]:
    """(username, password) of an admin created through the command line."""
    username = f"admin{secrets.token_hex(3)}"
    return username, stack.create_admin(username)


@pytest.fixture
async def admin_client(stack: Stack, admin: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    token = stack.token(*admin)
    async with _client(stack, token) as c:
        yield c


def _client(
    stack: Stack, token: str | None
) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
    return api_client(stack, token, timeout_s=30)


async def _enroll(client: httpx.AsyncClient, name: str) -> EnrolledAgent:
    r = await client.post("/agents", json={"name": name})
    assert r.status_code == 201, r.text
    body = r.json()
    return EnrolledAgent(id=body["agent"]["id"], name=name, credential=body["credential"])


async def _wait_online(
    client: httpx.AsyncClient, agent_id: str, online: bool = True, timeout_s: float = 15
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = await client.get(f"/agents/{agent_id}")
        if r.status_code == 200 and r.json()["online"] is online:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"agent {agent_id} online={online} not within {timeout_s}s")


async def _technician(stack: Stack, admin_client: httpx.AsyncClient, role: str = "tech") -> str:
    username = f"{role}{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    r = await admin_client.post(
        "/users", json={"username": username, "password": password, "role": role}
    )
    assert r.status_code == 201, r.text
    return stack.token(username, password)


@pytest.fixture
async def live_agent(
    stack: Stack, admin_client: httpx.AsyncClient
) -> AsyncIterator[tuple[EnrolledAgent, ManagedProcess]]:
    """A real gurutunnel-agent process, enrolled and online."""
    agent = await _enroll(admin_client, f"agent-{secrets.token_hex(3)}")
    proc = stack.start_agent(agent)
    try:
        await _wait_online(admin_client, agent.id)
        yield agent, proc
    finally:
        proc.stop()


def _error_code(r: httpx.Response) -> str:
    body: dict[str, Any] = r.json()
    assert set(body) == {"error"}, body
    code: str = body["error"]["code"]
    return code


async def test_open_status_close_round_trip(
    admin_client: httpx.AsyncClient, live_agent: tuple[EnrolledAgent, ManagedProcess]
) -> None:
    """A session opens active on a real agent, reports its status, and closes with audit rows."""
    agent, _ = live_agent
    r = await admin_client.post("/tunnel/open", json={"agent_id": agent.id})
    assert r.status_code == 201, r.text
    session = r.json()
    assert session["state"] == "active" and session["agent_id"] == agent.id
    assert session["conn_id"] and session["gateway_id"] == "gw1"

    r = await admin_client.get(f"/tunnel/status/{session['id']}")
    assert r.status_code == 200 and r.json()["state"] == "active"
    r = await admin_client.get("/tunnel/sessions", params={"agent_id": agent.id})
    assert r.json()["count"] == 1 and r.json()["data"][0]["id"] == session["id"]

    r = await admin_client.post("/tunnel/close", json={"session_id": session["id"]})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "closed" and r.json()["close_reason"] == "user"

    r = await admin_client.get("/audit", params={"session_id": session["id"]})
    actions = [row["action"] for row in r.json()["data"]]
    assert sorted(actions) == sorted(["session.open", "session.active", "session.close"])

    # the agent went back to heartbeat mode on the same socket: a new session opens at once
    r = await admin_client.post("/tunnel/open", json={"agent_id": agent.id})
    assert r.status_code == 201, r.text
    assert r.json()["conn_id"] == session["conn_id"]


async def test_second_open_for_same_agent_gets_409(
    admin_client: httpx.AsyncClient, live_agent: tuple[EnrolledAgent, ManagedProcess]
) -> None:
    """While a session is active, a second open answers 409 session_exists."""
    agent, _ = live_agent
    first = await admin_client.post("/tunnel/open", json={"agent_id": agent.id})
    assert first.status_code == 201
    second = await admin_client.post("/tunnel/open", json={"agent_id": agent.id})
    assert second.status_code == 409
    assert _error_code(second) == "session_exists"


async def test_open_on_offline_agent_gets_409_at_once(
    stack: Stack, admin_client: httpx.AsyncClient
) -> None:
    """An enrolled agent with no socket answers 409 agent_offline well before any timeout."""
    agent = await _enroll(admin_client, "never-connected")
    started = time.monotonic()
    r = await admin_client.post("/tunnel/open", json={"agent_id": agent.id})
    elapsed = time.monotonic() - started
    assert r.status_code == 409 and _error_code(r) == "agent_offline"
    assert elapsed < 1.0, f"offline answered after {elapsed:.2f}s"
    sessions = (await admin_client.get("/tunnel/sessions", params={"agent_id": agent.id})).json()
    assert [s["state"] for s in sessions["data"]] == ["failed"]


async def test_agent_that_never_answers_gets_504_and_is_free_again(
    stack: Stack, admin_client: httpx.AsyncClient
) -> None:
    """No tunnel.ready within the open timeout: 504, session failed, the next open succeeds."""
    agent = await _enroll(admin_client, "mute")
    async with scripted_agent(stack.gateway_ws_url(), agent.credential, answer_open=False) as fake:
        await _wait_online(admin_client, agent.id)
        r = await admin_client.post("/tunnel/open", json={"agent_id": agent.id})
        assert r.status_code == 504 and _error_code(r) == "agent_timeout"
        assert fake.opens_seen == 1
        sessions = (
            await admin_client.get("/tunnel/sessions", params={"agent_id": agent.id})
        ).json()["data"]
        assert [(s["state"], s["close_reason"]) for s in sessions] == [("failed", "open_timeout")]

        fake.answer_open = True
        r = await admin_client.post("/tunnel/open", json={"agent_id": agent.id})
        assert r.status_code == 201, r.text


async def test_sigkilled_agent_closes_its_session_within_2s(
    admin_client: httpx.AsyncClient, live_agent: tuple[EnrolledAgent, ManagedProcess]
) -> None:
    """SIGKILL of the agent closes its session agent_disconnected, with one audit row, in 2 s."""
    agent, proc = live_agent
    r = await admin_client.post("/tunnel/open", json={"agent_id": agent.id})
    assert r.status_code == 201
    session_id = r.json()["id"]

    proc.kill()
    killed = time.monotonic()
    state = ""
    while time.monotonic() - killed < 2.0:
        body = (await admin_client.get(f"/tunnel/status/{session_id}")).json()
        state = body["state"]
        if state == "closed":
            assert body["close_reason"] == "agent_disconnected"
            break
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - killed
    assert state == "closed", f"session still {state} {elapsed:.2f}s after SIGKILL"

    rows = (await admin_client.get("/audit", params={"session_id": session_id})).json()["data"]
    closes = [row for row in rows if row["action"] == "session.close"]
    assert len(closes) == 1 and closes[0]["reason"] == "agent_disconnected"
    await _wait_online(admin_client, agent.id, online=False)


async def test_twenty_concurrent_opens_give_exactly_one_201(
    admin_client: httpx.AsyncClient, live_agent: tuple[EnrolledAgent, ManagedProcess]
) -> None:
    """20 opens at once on one agent: one 201, nineteen 409, no 5xx."""
    agent, _ = live_agent
    results = await asyncio.gather(
        *(admin_client.post("/tunnel/open", json={"agent_id": agent.id}) for _ in range(20))
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [201] + [409] * 19, statuses
    assert {_error_code(r) for r in results if r.status_code == 409} <= {
        "session_exists",
        "agent_busy",
    }
    active = (
        await admin_client.get("/tunnel/sessions", params={"agent_id": agent.id, "state": "active"})
    ).json()
    assert active["count"] == 1


async def test_non_owner_close_gets_403_and_admin_close_works(
    stack: Stack,
    admin_client: httpx.AsyncClient,
    live_agent: tuple[EnrolledAgent, ManagedProcess],
) -> None:
    """Another technician cannot close a session (403); an admin can."""
    agent, _ = live_agent
    owner = await _technician(stack, admin_client)
    other = await _technician(stack, admin_client)
    async with _client(stack, owner) as owner_client, _client(stack, other) as other_client:
        r = await owner_client.post("/tunnel/open", json={"agent_id": agent.id})
        assert r.status_code == 201, r.text
        session_id = r.json()["id"]
        r = await other_client.post("/tunnel/close", json={"session_id": session_id})
        assert r.status_code == 403 and _error_code(r) == "forbidden"
        assert (await owner_client.get(f"/tunnel/status/{session_id}")).json()["state"] == "active"
    r = await admin_client.post("/tunnel/close", json={"session_id": session_id})
    assert r.status_code == 200 and r.json()["state"] == "closed"


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@pytest.fixture
def bad_tokens(stack: Stack, admin: tuple[str, str]) -> dict[str, str | None]:
    good = stack.token(*admin)
    claims = jwt.decode(good, options={"verify_signature": False})
    now = int(time.time())
    expired = jwt.encode(
        {**claims, "iat": now - 7200, "exp": now - 3600}, stack.jwt_secret, algorithm="HS256"
    )
    header, payload, signature = good.split(".")
    tampered_payload = _b64({**claims, "role": "admin", "sub": "someone-else"})
    flipped = signature[:-2] + ("AA" if not signature.endswith("AA") else "BB")
    return {
        "missing": None,
        "garbage": "not-a-jwt",
        "expired": expired,
        "tampered payload": f"{header}.{tampered_payload}.{signature}",
        "tampered signature": f"{header}.{payload}.{flipped}",
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "wrong key": jwt.encode(claims, "x" * 48, algorithm="HS256"),
    }


async def test_bad_tokens_get_401(stack: Stack, bad_tokens: dict[str, str | None]) -> None:
    """Missing, garbage, expired, tampered, alg none and foreign-key tokens all answer 401."""
    for name, token in bad_tokens.items():
        async with _client(stack, token) as c:
            r = await c.get("/tunnel/sessions")
        assert r.status_code == 401, f"{name}: {r.status_code} {r.text}"
        assert _error_code(r) == "unauthorized", name
