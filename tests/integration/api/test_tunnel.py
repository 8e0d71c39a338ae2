"""Tunnel sessions end to end: real NATS, both databases, a fake gateway on the bus."""

from __future__ import annotations

import asyncio
import time

import pytest

from .conftest import Api, EnrolledAgent, FakeGateway, Users, wait_until


async def audit_actions(api: Api, users: Users, session_id: str) -> list[tuple[str, str | None]]:
    resp = await api.client.get(
        "/api/v1/audit", params={"session_id": session_id}, headers=users.admin.headers
    )
    assert resp.status_code == 200, resp.text
    return [(row["action"], row["reason"]) for row in resp.json()["data"]]


async def test_open_status_close_round_trip_writes_one_audit_row_per_change(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """Open answers 201 active bound to conn/gateway; close answers closed; audit has 3 rows."""
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 201, resp.text
    opened = resp.json()
    assert opened["state"] == "active"
    assert opened["conn_id"] == gateway.conn_id
    assert opened["gateway_id"] == gateway.gateway_id
    assert opened["tech_id"] == users.tech.id
    assert opened["opened_at"] is not None

    status = await api.client.get(
        f"/api/v1/tunnel/status/{opened['id']}", headers=users.viewer.headers
    )
    assert status.status_code == 200
    assert status.json()["state"] == "active"

    resp = await api.client.post(
        "/api/v1/tunnel/close", json={"session_id": opened["id"]}, headers=users.tech.headers
    )
    assert resp.status_code == 200, resp.text
    closed = resp.json()
    assert closed["state"] == "closed"
    assert closed["close_reason"] == "user"
    assert closed["closed_at"] is not None

    assert await audit_actions(api, users, opened["id"]) == [
        ("session.open", None),
        ("session.active", None),
        ("session.close", "user"),
    ]

    async def close_reached_agent() -> bool:
        return any(c.session_id == opened["id"] for c in gateway.closes())

    await wait_until(close_reached_agent, what="tunnel.close at the agent")


async def test_second_open_for_same_agent_gets_409_session_exists(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """A second open while a session is active is refused with session_exists."""
    first = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert first.status_code == 201
    second = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.admin.headers
    )
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "session_exists"


async def test_open_without_gateway_gets_409_agent_offline_at_once(
    api: Api, users: Users, agent: EnrolledAgent
) -> None:
    """No responder on the agent's subject: 409 agent_offline well under a second."""
    started = time.monotonic()
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    elapsed = time.monotonic() - started
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "agent_offline"
    assert elapsed < 0.5, elapsed
    listed = await api.client.get(
        "/api/v1/tunnel/sessions", params={"agent_id": agent.id}, headers=users.tech.headers
    )
    rows = listed.json()["data"]
    assert [(r["state"], r["close_reason"]) for r in rows] == [("failed", "agent_offline")]


async def test_open_without_answer_gets_504_then_agent_is_free_again(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """No answer within open_timeout_s: 504, session failed/open_timeout, a tunnel.close is
    sent, and the next open succeeds."""
    gateway.mode = "never"
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "agent_timeout"
    failed = (
        await api.client.get(
            "/api/v1/tunnel/sessions", params={"state": "failed"}, headers=users.tech.headers
        )
    ).json()["data"]
    assert [r["close_reason"] for r in failed] == ["open_timeout"]

    async def late_close_sent() -> bool:
        return any(c.session_id == failed[0]["id"] for c in gateway.closes())

    await wait_until(late_close_sent, what="best-effort tunnel.close after the timeout")

    gateway.mode = "ready"
    again = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert again.status_code == 201, again.text


async def test_busy_agent_gets_409_agent_busy(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """tunnel.error{tunnel_busy} from the agent: 409 agent_busy and the session failed."""
    gateway.mode = "busy"
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "agent_busy"
    rows = (await api.client.get("/api/v1/tunnel/sessions", headers=users.tech.headers)).json()[
        "data"
    ]
    assert [(r["state"], r["close_reason"]) for r in rows] == [("failed", "agent_busy")]


async def test_unexpected_agent_answer_gets_502_agent_error(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """An answer that is neither ready nor error: 502 agent_error, session failed."""
    gateway.mode = "error"
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "agent_error"


async def test_twenty_concurrent_opens_give_one_201_and_nineteen_409(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """Concurrent opens on one agent: exactly one wins, the rest get session_exists, no 5xx."""
    results = await asyncio.gather(
        *(
            api.client.post(
                "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
            )
            for _ in range(20)
        )
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [201] + [409] * 19, [r.text for r in results if r.status_code != 409]
    assert {r.json()["error"]["code"] for r in results if r.status_code == 409} == {
        "session_exists"
    }


async def test_close_by_other_tech_is_403_and_by_admin_is_200(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway
) -> None:
    """Only the owner or an admin may close; a repeated close returns the closed session."""
    opened = (
        await api.client.post(
            "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
        )
    ).json()
    body = {"session_id": opened["id"]}
    other = await api.client.post("/api/v1/tunnel/close", json=body, headers=users.tech2.headers)
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "forbidden"
    viewer = await api.client.post("/api/v1/tunnel/close", json=body, headers=users.viewer.headers)
    assert viewer.status_code == 403
    admin = await api.client.post("/api/v1/tunnel/close", json=body, headers=users.admin.headers)
    assert admin.status_code == 200
    assert admin.json()["state"] == "closed"
    again = await api.client.post("/api/v1/tunnel/close", json=body, headers=users.tech.headers)
    assert again.status_code == 200
    assert again.json()["closed_at"] == admin.json()["closed_at"]
    actions = await audit_actions(api, users, opened["id"])
    assert [a for a, _ in actions].count("session.close") == 1


async def test_viewer_open_is_403(api: Api, users: Users, agent: EnrolledAgent) -> None:
    """Viewers read sessions but may not open one."""
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.viewer.headers
    )
    assert resp.status_code == 403
    assert resp.json() == {"error": {"code": "forbidden", "message": "your role may not do this"}}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_unknown_session_and_agent_are_404(api: Api, users: Users) -> None:
    """Well-formed ids that name nothing answer 404 not_found."""
    for resp in (
        await api.client.get("/api/v1/tunnel/status/nope", headers=users.tech.headers),
        await api.client.post(
            "/api/v1/tunnel/close", json={"session_id": "nope"}, headers=users.tech.headers
        ),
        await api.client.post(
            "/api/v1/tunnel/open", json={"agent_id": "nope"}, headers=users.tech.headers
        ),
        await api.client.get("/api/v1/agents/nope", headers=users.tech.headers),
    ):
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] == "not_found"
