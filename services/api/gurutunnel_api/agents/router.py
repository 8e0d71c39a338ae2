"""``/api/v1/agents``: enrol (admin), list and read (any role), revoke (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from ..deps import AdminUser, BusDep, CurrentUser, IdPath, SessionDep, SettingsDep, SigningKeyDep
from ..schemas import error_responses
from . import service
from .schemas import AgentCreate, AgentEnrolled, AgentPublic, AgentsPublic

router = APIRouter(prefix="/api/v1/agents", tags=["agents"])


@router.post(
    "",
    response_model=AgentEnrolled,
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(401, 403),
)
async def enroll_agent(
    body: AgentCreate, db: SessionDep, settings: SettingsDep, key: SigningKeyDep, admin: AdminUser
) -> AgentEnrolled:
    agent, credential = await service.enroll_agent(
        db, settings=settings, key=key, name=body.name, admin=admin
    )
    return AgentEnrolled(agent=AgentPublic.from_row(agent), credential=credential)


@router.get("", response_model=AgentsPublic, responses=error_responses(401))
async def list_agents(
    db: SessionDep,
    _: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> AgentsPublic:
    rows, count = await service.list_agents(db, limit=limit, offset=offset)
    return AgentsPublic(data=[AgentPublic.from_row(r) for r in rows], count=count)


@router.get("/{agent_id}", response_model=AgentPublic, responses=error_responses(401, 404))
async def get_agent(agent_id: IdPath, db: SessionDep, _: CurrentUser) -> AgentPublic:
    return AgentPublic.from_row(await service.get_agent(db, agent_id=agent_id))


@router.post(
    "/{agent_id}/revoke", response_model=AgentPublic, responses=error_responses(401, 403, 404)
)
async def revoke_agent(
    agent_id: IdPath, db: SessionDep, bus: BusDep, settings: SettingsDep, admin: AdminUser
) -> AgentPublic:
    agent = await service.revoke_agent(
        db, bus=bus, settings=settings, agent_id=agent_id, admin=admin
    )
    return AgentPublic.from_row(agent)
