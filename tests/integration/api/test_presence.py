"""Presence events close sessions durably, idempotently and with conn_id fencing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nats.aio.client import Client as NatsClient

from gurutunnel_api.config import ApiSettings
from gurutunnel_protocol import new_id

from .conftest import (
    Api,
    EnrolledAgent,
    FakeGateway,
    Presence,
    Users,
    enroll,
    running_api,
)


async def open_session(api: Api, users: Users, agent: EnrolledAgent) -> dict[str, object]:
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 201, resp.text
    body: dict[str, object] = resp.json()
    return body


async def session(api: Api, users: Users, session_id: object) -> dict[str, object]:
    resp = await api.client.get(f"/api/v1/tunnel/status/{session_id}", headers=users.tech.headers)
    body: dict[str, object] = resp.json()
    return body


async def audit_rows(api: Api, users: Users, session_id: object) -> list[tuple[str, str]]:
    resp = await api.client.get(
        "/api/v1/audit", params={"session_id": str(session_id)}, headers=users.admin.headers
    )
    return [(r["action"], r["reason"]) for r in resp.json()["data"]]


async def agent_state(api: Api, users: Users, agent_id: str) -> dict[str, object]:
    body: dict[str, object] = (
        await api.client.get(f"/api/v1/agents/{agent_id}", headers=users.tech.headers)
    ).json()
    return body


async def test_disconnect_closes_bound_session_once_and_replay_changes_nothing(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway, presence: Presence
) -> None:
    """disconnected(conn) closes the session with agent_disconnected and one audit row; a
    redelivered copy of the same event changes nothing."""
    await presence.send(gateway.connected())
    assert (await agent_state(api, users, agent.id))["online"] is True
    opened = await open_session(api, users, agent)

    event = gateway.disconnected()
    await presence.send(event)
    closed = await session(api, users, opened["id"])
    assert (closed["state"], closed["close_reason"]) == ("closed", "agent_disconnected")
    assert (await agent_state(api, users, agent.id))["online"] is False

    # the same event again under another message id (as a redelivery would bring it)
    await presence.send(event, msg_id=new_id())
    assert await session(api, users, opened["id"]) == closed
    assert await audit_rows(api, users, opened["id"]) == [
        ("session.open", None),
        ("session.active", None),
        ("session.close", "agent_disconnected"),
    ]


async def test_disconnect_of_older_conn_closes_nothing_newer(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway, presence: Presence
) -> None:
    """An old connection's disconnect neither closes the session of the new connection nor
    marks the agent offline."""
    old_conn = gateway.conn_id
    await presence.send(gateway.connected(at=datetime.now(UTC) - timedelta(seconds=5)))
    gateway.conn_id = new_id()  # the agent reconnected
    await presence.send(gateway.connected())
    opened = await open_session(api, users, agent)
    assert opened["conn_id"] == gateway.conn_id

    await presence.send(gateway.disconnected(conn_id=old_conn))
    assert (await session(api, users, opened["id"]))["state"] == "active"
    assert (await agent_state(api, users, agent.id))["online"] is True


async def test_connected_on_new_conn_closes_sessions_of_older_conn(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway, presence: Presence
) -> None:
    """connected(new conn) closes the sessions bound to a connection whose connected event came
    earlier in the stream."""
    await presence.send(gateway.connected())
    opened = await open_session(api, users, agent)
    gateway.conn_id = new_id()
    await presence.send(gateway.connected())
    closed = await session(api, users, opened["id"])
    assert (closed["state"], closed["close_reason"]) == ("closed", "agent_disconnected")
    state = await agent_state(api, users, agent.id)
    assert state["online"] is True
    assert state["gateway_id"] == gateway.gateway_id


async def test_activation_on_already_disconnected_conn_answers_409_agent_offline(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway, presence: Presence
) -> None:
    """A ready answer from a connection whose disconnect was already handled: the session is
    closed at once and the open answers 409 agent_offline."""
    await presence.send(gateway.disconnected())
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "agent_offline"
    rows = (await api.client.get("/api/v1/tunnel/sessions", headers=users.tech.headers)).json()
    assert [(r["state"], r["close_reason"]) for r in rows["data"]] == [
        ("closed", "agent_disconnected")
    ]


async def test_presence_published_while_api_stopped_is_handled_after_restart(
    migrated: ApiSettings, users: Users, nc: NatsClient, presence: Presence
) -> None:
    """The stream keeps a disconnect published while no API runs; the restarted API closes
    the session."""
    async with running_api(migrated) as first:
        agent = await enroll(first, users.admin)
        gateway = await FakeGateway(nc=nc, subjects=presence.subjects, agent_id=agent.id).start()
        opened = await open_session(first, users, agent)
        await gateway.stop()
    seq = await presence.publish(gateway.disconnected())

    async with running_api(migrated) as restarted:
        await presence.wait_handled(seq)
        closed = await session(restarted, users, opened["id"])
        assert (closed["state"], closed["close_reason"]) == ("closed", "agent_disconnected")
