"""Bus consumers for agents: agent heartbeats (last_seen_at, metrics) and gateway leases.

Agent heartbeats are core NATS (at most once) and carry no state change worth auditing; each
one overwrites the agent's metrics and advances ``last_seen_at``. Unknown agents are ignored.

A gateway heartbeat renews that gateway's lease in one statement, race-safe on PostgreSQL and
SQLite alike (``INSERT ... ON CONFLICT (gateway_id) DO UPDATE ... WHERE``): two API replicas
handling the first heartbeats of a gateway at once never raise. ``renewed_at`` is this API's
clock when the heartbeat is handled (clock skew between machines can neither expire nor extend a
lease); the gateway's ``at`` is kept as ``last_seen_at`` for information only. A heartbeat of the
boot the lease reaper declared lost (``lost_boot_id``) changes nothing: that boot's sessions
stay closed and its lease stays lost, and the handler returns False so that the bus tells the
gateway to fence itself (``GatewayLeaseLost``); a heartbeat of any other boot starts a fresh
lease. When that boot differs from the row's, the row's boot has ended (its process restarted
under the same gateway id): the same statement records it in ``lost_boot_id``, and the lease
reaper closes the sessions of its connections.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from sqlalchemy import CursorResult, case, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from gurutunnel_protocol.messages import AgentHeartbeat, GatewayHeartbeat

from ..db import utcnow
from .models import Agent, GatewayLease

log = logging.getLogger(__name__)


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
) -> bool:
    """Renew the gateway's lease; False (logged) when the heartbeat's boot was declared lost."""
    async with sessionmaker() as db, db.begin():
        renewed = await renew_lease(db, heartbeat)
    if not renewed:
        log.warning(
            "heartbeat of lost gateway boot %s ignored; telling the gateway to fence itself",
            heartbeat.boot_id,
            extra={"gateway_id": heartbeat.gateway_id},
        )
    return renewed


async def renew_lease(db: AsyncSession, heartbeat: GatewayHeartbeat) -> bool:
    """Upsert the lease row (see the module contract); whether a row was written."""
    values: dict[str, Any] = {
        "gateway_id": heartbeat.gateway_id,
        "boot_id": heartbeat.boot_id,
        "last_seen_at": heartbeat.at,
        "renewed_at": utcnow(),
        "lease_ttl_s": heartbeat.lease_ttl_s,
        "agents": heartbeat.agents,
        "draining": heartbeat.draining,
    }
    dialect = db.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(GatewayLease).values(**values)
    changed_boot = col(GatewayLease.boot_id) != stmt.excluded.boot_id
    stmt = stmt.on_conflict_do_update(
        index_elements=[col(GatewayLease.gateway_id)],
        set_={
            **{name: stmt.excluded[name] for name in values if name != "gateway_id"},
            # a new boot of the same gateway id means the old process is gone (a restart
            # within its TTL never expires its lease): the old boot ends here, and the
            # reaper closes the sessions of its connections
            "lost_boot_id": case(
                (changed_boot, col(GatewayLease.boot_id)), else_=col(GatewayLease.lost_boot_id)
            ),
            "lost_at": case(
                (changed_boot, stmt.excluded.renewed_at), else_=col(GatewayLease.lost_at)
            ),
        },
        where=or_(
            col(GatewayLease.lost_boot_id).is_(None),
            col(GatewayLease.lost_boot_id) != stmt.excluded.boot_id,
        ),
    )
    result = cast(CursorResult[Any], await db.execute(stmt))
    return result.rowcount == 1
