"""Agents: enrolment (credential minted once), listing, and revocation.

Revocation order: the KV revocation is written first (a bus failure answers 503 before any
database change), then ``revoked_at`` and the close of the agent's open session (reason
``revoked``) commit together with their audit rows; a repeat is idempotent.
"""

from __future__ import annotations

import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from gurutunnel_protocol import new_id
from gurutunnel_protocol.messages import TunnelClose

from ..audit.models import AuditAction
from ..audit.service import record
from ..auth.models import Technician
from ..bus import Bus
from ..config import ApiSettings
from ..db import utcnow
from ..errors import NotFound
from ..security import mint_agent_credential
from ..sessions.service import close_open_sessions, lock_agent
from .models import Agent

log = logging.getLogger(__name__)


async def enroll_agent(
    db: AsyncSession,
    *,
    settings: ApiSettings,
    key: Ed25519PrivateKey,
    name: str,
    admin: Technician,
) -> tuple[Agent, str]:
    agent = Agent(id=new_id(), name=name)
    async with db.begin():
        db.add(agent)
        record(db, actor=admin.id, action=AuditAction.AGENT_ENROLL, agent_id=agent.id)
    credential = mint_agent_credential(
        key=key, agent_id=agent.id, ttl_s=settings.agent_credential_ttl_s
    )
    # the credential is returned once and never logged
    log.info("agent enrolled", extra={"agent_id": agent.id})
    return agent, credential


async def list_agents(db: AsyncSession, *, limit: int, offset: int) -> tuple[list[Agent], int]:
    async with db.begin():
        count = await db.scalar(select(func.count()).select_from(Agent))
        rows = await db.scalars(
            select(Agent).order_by(col(Agent.created_at), col(Agent.id)).limit(limit).offset(offset)
        )
        return list(rows), int(count or 0)


async def get_agent(db: AsyncSession, *, agent_id: str) -> Agent:
    async with db.begin():
        agent = await db.get(Agent, agent_id)
    if agent is None:
        raise NotFound("agent not found")
    return agent


async def revoke_agent(
    db: AsyncSession, *, bus: Bus, settings: ApiSettings, agent_id: str, admin: Technician
) -> Agent:
    agent = await get_agent(db, agent_id=agent_id)
    not_before = agent.revoked_at or utcnow()
    await bus.publish_revocation(agent_id, not_before)
    async with db.begin():
        locked = await lock_agent(db, agent_id)
        if locked is None:
            raise NotFound("agent not found")
        if locked.revoked_at is None:
            locked.revoked_at = not_before
            record(db, actor=admin.id, action=AuditAction.AGENT_REVOKE, agent_id=agent_id)
        closed = await close_open_sessions(db, agent_id=agent_id, reason="revoked", actor=admin.id)
    for row in closed:
        bus.send_best_effort(
            agent_id,
            TunnelClose(req_id=new_id(), session_id=row.id, reason="revoked"),
            settings.close_timeout_s,
        )
    return locked
