"""Bus consumers for agents: agent heartbeats (last_seen_at, metrics) and gateway leases.

Heartbeats are core NATS (at most once) and carry no state change worth auditing; each one
overwrites the agent's metrics and advances ``last_seen_at``. Unknown agents are ignored.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gurutunnel_protocol.messages import AgentHeartbeat, GatewayHeartbeat

from .models import Agent, GatewayLease


async def handle_agent_heartbeat(
    sessionmaker: async_sessionmaker[AsyncSession], heartbeat: AgentHeartbeat
) -> None:
    async with sessionmaker() as db, db.begin():
        agent = await db.get(Agent, heartbeat.agent_id)
        if agent is None:
            return
        if agent.last_seen_at is None or agent.last_seen_at < heartbeat.at:
            agent.last_seen_at = heartbeat.at
        agent.metrics = heartbeat.metrics.model_dump(mode="json")


async def handle_gateway_heartbeat(
    sessionmaker: async_sessionmaker[AsyncSession], heartbeat: GatewayHeartbeat
) -> None:
    async with sessionmaker() as db, db.begin():
        lease = await db.get(GatewayLease, heartbeat.gateway_id)
        if lease is None:
            lease = GatewayLease(
                gateway_id=heartbeat.gateway_id,
                boot_id=heartbeat.boot_id,
                last_seen_at=heartbeat.at,
                lease_ttl_s=heartbeat.lease_ttl_s,
            )
            db.add(lease)
        lease.boot_id = heartbeat.boot_id
        lease.last_seen_at = heartbeat.at
        lease.lease_ttl_s = heartbeat.lease_ttl_s
        lease.agents = heartbeat.agents
        lease.draining = heartbeat.draining
