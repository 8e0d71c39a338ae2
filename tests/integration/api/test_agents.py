"""Agents: enrolment credentials, revocation through the KV bucket, heartbeats."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from nats.aio.client import Client as NatsClient
from sqlmodel import select

from gurutunnel_api.agents.models import GatewayLease
from gurutunnel_api.db import make_engine, make_sessionmaker
from gurutunnel_api.security import verify_agent_credential
from gurutunnel_protocol.envelope import encode
from gurutunnel_protocol.messages import AgentHeartbeat, GatewayHeartbeat, HostMetrics

from .conftest import Api, EnrolledAgent, FakeGateway, Users, wait_until


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_enrolment_returns_a_credential_the_public_key_verifies(
    api: Api, users: Users, key_files: tuple[Path, Path]
) -> None:
    """The credential is EdDSA for the gateway audience, typ agent, sub = the new agent id."""
    resp = await api.client.post(
        "/api/v1/agents", json={"name": "pc-42"}, headers=users.admin.headers
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["agent"] == {
        "id": body["agent"]["id"],
        "name": "pc-42",
        "online": False,
        "last_seen_at": None,
        "gateway_id": None,
        "revoked": False,
        "metrics": None,
    }
    public_key = load_pem_public_key(key_files[1].read_bytes())
    assert isinstance(public_key, Ed25519PublicKey)
    claims = verify_agent_credential(body["credential"], public_key=public_key)
    assert claims["sub"] == body["agent"]["id"]
    assert claims["aud"] == "gurutunnel-gateway"
    assert jwt.get_unverified_header(body["credential"])["alg"] == "EdDSA"
    listed = (await api.client.get("/api/v1/agents", headers=users.viewer.headers)).json()
    assert listed["count"] == 1
    assert body["credential"] not in str(listed)


async def test_revoke_writes_the_kv_key_and_closes_the_session_with_revoked(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway, nc: NatsClient
) -> None:
    """Revocation: KV agent_id -> not_before, agent revoked, open session closed (revoked)."""
    opened = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert opened.status_code == 201
    denied = await api.client.post(f"/api/v1/agents/{agent.id}/revoke", headers=users.tech.headers)
    assert denied.status_code == 403
    before = datetime.now(UTC)
    resp = await api.client.post(f"/api/v1/agents/{agent.id}/revoke", headers=users.admin.headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["revoked"] is True

    kv = await nc.jetstream().key_value(gateway.subjects.revocation_bucket)
    entry = await kv.get(agent.id)
    assert entry.value is not None
    not_before = datetime.fromisoformat(entry.value.decode())
    assert before <= not_before <= datetime.now(UTC)

    status = (
        await api.client.get(
            f"/api/v1/tunnel/status/{opened.json()['id']}", headers=users.tech.headers
        )
    ).json()
    assert (status["state"], status["close_reason"]) == ("closed", "revoked")
    again = await api.client.post(f"/api/v1/agents/{agent.id}/revoke", headers=users.admin.headers)
    assert again.status_code == 200
    audit = (
        await api.client.get(
            "/api/v1/audit", params={"agent_id": agent.id}, headers=users.admin.headers
        )
    ).json()["data"]
    assert [a["action"] for a in audit].count("agent.revoke") == 1
    reopen = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert reopen.status_code == 409
    assert reopen.json()["error"]["code"] == "conflict"


async def test_heartbeats_update_last_seen_metrics_and_gateway_leases(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway, nc: NatsClient
) -> None:
    """Agent heartbeats set last_seen_at and metrics; gateway heartbeats record the lease."""
    now = datetime.now(UTC)
    metrics = HostMetrics(
        hostname="pc-01",
        os="Linux",
        cpu_percent=12.5,
        cpu_count=4,
        mem_total_bytes=8 << 30,
        mem_used_percent=40.0,
        disk_total_bytes=256 << 30,
        disk_used_percent=70.0,
        boot_time=now,
    )
    heartbeat = AgentHeartbeat(
        agent_id=agent.id,
        gateway_id=gateway.gateway_id,
        boot_id=gateway.boot_id,
        conn_id=gateway.conn_id,
        at=now,
        mode="heartbeat",
        metrics=metrics,
    )
    await nc.publish(gateway.subjects.agent_events(agent.id, "heartbeat"), encode(heartbeat))
    lease = GatewayHeartbeat(
        gateway_id=gateway.gateway_id, boot_id=gateway.boot_id, at=now, agents=1, lease_ttl_s=5
    )
    await nc.publish(gateway.subjects.gateway_heartbeat(), encode(lease))

    async def seen() -> bool:
        body = (
            await api.client.get(f"/api/v1/agents/{agent.id}", headers=users.viewer.headers)
        ).json()
        return body["metrics"] is not None

    await wait_until(seen, what="heartbeat applied")
    body = (await api.client.get(f"/api/v1/agents/{agent.id}", headers=users.viewer.headers)).json()
    assert body["metrics"]["hostname"] == "pc-01"
    assert datetime.fromisoformat(body["last_seen_at"]) == now

    engine = make_engine(api.settings)
    try:

        async def leased() -> bool:
            async with make_sessionmaker(engine)() as db, db.begin():
                rows = list(await db.scalars(select(GatewayLease)))
            return [(r.gateway_id, r.agents) for r in rows] == [(gateway.gateway_id, 1)]

        await wait_until(leased, what="gateway lease recorded")
    finally:
        await engine.dispose()
