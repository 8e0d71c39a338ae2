"""Presence handlers: close sessions whose connection ended, with fencing by ``conn_id``.

Contract (docs/design.md "Sessions (api)"), each handler in one transaction holding the agent
row lock, and idempotent (a replayed event changes nothing and writes no audit row):
- ``disconnected(conn_id)`` records the connection as gone, closes the sessions bound to that
  connection (one audit row each) with the close reason ``close_reason_for`` maps the
  disconnect reason to (the gateway drained: ``gateway_shutdown``; it lost its lease:
  ``gateway_lost``; revoked: ``revoked``; anything else, including ``replaced`` by a newer
  connection of the agent: ``agent_disconnected``) and marks the agent offline only if
  ``agent.conn_id == conn_id`` (an old connection's disconnect never touches a newer one).
- ``connected(conn_id)`` with stream sequence ``seq`` records the connection and ``seq`` as its
  ``connected_seq``, marks the agent online on it unless a connection with a higher
  ``connected_seq`` is already known (or this one is already gone), and closes the agent's
  active sessions bound to connections whose ``connected_seq`` is lower than ``seq``. Order
  comes from the one JetStream stream, never from comparing the gateway's clock (``at``) with
  the API's (activation time); a session on a connection whose ``connected`` was not handled
  yet is left alone (its own ``connected`` or ``disconnected`` settles it).
Events for unknown agents are acknowledged and ignored.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gurutunnel_protocol.messages import (
    AgentConnected,
    AgentDisconnected,
    DisconnectReason,
    PresenceEvent,
)

from ..agents.models import AgentConnection
from ..audit.models import SYSTEM_ACTOR
from .service import close_open_sessions, lock_agent

log = logging.getLogger(__name__)

# Why the session ended, seen from the technician: the gateway's doing or the agent's link.
# ``replaced`` stays ``agent_disconnected``: the socket that carried the session is gone because
# the agent came back on a newer one (whose own session starts afresh).
_CLOSE_REASONS: dict[DisconnectReason, str] = {
    DisconnectReason.SHUTDOWN: "gateway_shutdown",
    DisconnectReason.LEASE_LOST: "gateway_lost",
    DisconnectReason.REVOKED: "revoked",
}


def close_reason_for(reason: DisconnectReason) -> str:
    """The session close reason for a connection that ended with ``reason``."""
    return _CLOSE_REASONS.get(reason, "agent_disconnected")


async def handle_presence(
    sessionmaker: async_sessionmaker[AsyncSession], event: PresenceEvent, seq: int
) -> None:
    """Handle one presence event; ``seq`` is its JetStream stream sequence."""
    async with sessionmaker() as db:
        if isinstance(event, AgentDisconnected):
            await on_disconnected(db, event)
        else:
            await on_connected(db, event, seq)


async def on_disconnected(db: AsyncSession, event: AgentDisconnected) -> None:
    async with db.begin():
        agent = await lock_agent(db, event.agent_id)
        if agent is None:
            log.info("presence for unknown agent ignored", extra={"agent_id": event.agent_id})
            return
        conn = await db.get(AgentConnection, event.conn_id)
        if conn is None:
            db.add(
                AgentConnection(
                    conn_id=event.conn_id,
                    agent_id=event.agent_id,
                    gateway_id=event.gateway_id,
                    boot_id=event.boot_id,
                    disconnected_at=event.at,
                )
            )
        elif conn.agent_id != event.agent_id:
            log.warning(
                "disconnect names a connection of another agent", extra={"conn_id": event.conn_id}
            )
            return
        elif conn.disconnected_at is None:
            conn.disconnected_at = event.at
        await close_open_sessions(
            db,
            agent_id=event.agent_id,
            conn_id=event.conn_id,
            reason=close_reason_for(event.reason),
            actor=SYSTEM_ACTOR,
            detail={
                "event_id": event.event_id,
                "conn_id": event.conn_id,
                "gateway_id": event.gateway_id,
                "disconnect": event.reason.value,
            },
        )
        if agent.conn_id == event.conn_id and agent.online:
            agent.online = False


async def on_connected(db: AsyncSession, event: AgentConnected, seq: int) -> None:
    async with db.begin():
        agent = await lock_agent(db, event.agent_id)
        if agent is None:
            log.info("presence for unknown agent ignored", extra={"agent_id": event.agent_id})
            return
        conn = await db.get(AgentConnection, event.conn_id)
        if conn is None:
            conn = AgentConnection(
                conn_id=event.conn_id,
                agent_id=event.agent_id,
                gateway_id=event.gateway_id,
                boot_id=event.boot_id,
                connected_at=event.at,
                connected_seq=seq,
            )
            db.add(conn)
        elif conn.agent_id != event.agent_id:
            log.warning(
                "connect names a connection of another agent", extra={"conn_id": event.conn_id}
            )
            return
        else:
            if conn.connected_at is None:
                conn.connected_at = event.at
            if conn.connected_seq is None:
                conn.connected_seq = seq
        if conn.disconnected_at is None and agent.conn_id != event.conn_id:
            current = await db.get(AgentConnection, agent.conn_id) if agent.conn_id else None
            newer_known = (
                current is not None
                and current.connected_seq is not None
                and current.connected_seq > seq
            )
            if not newer_known:
                agent.conn_id = event.conn_id
                agent.gateway_id = event.gateway_id
                agent.online = True
                if agent.last_seen_at is None or agent.last_seen_at < event.at:
                    agent.last_seen_at = event.at
        elif conn.disconnected_at is None and not agent.online:
            agent.online = True
        await close_open_sessions(
            db,
            agent_id=event.agent_id,
            on_conns_connected_before_seq=seq,
            reason="agent_disconnected",
            actor=SYSTEM_ACTOR,
            detail={"event_id": event.event_id, "new_conn_id": event.conn_id},
        )
