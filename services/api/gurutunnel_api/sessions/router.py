"""``/api/v1/tunnel``: open (admin, tech), close (owner or admin), read (every role)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from gurutunnel_protocol import ID_PATTERN

from ..deps import (
    BusDep,
    CurrentUser,
    IdPath,
    MetricsDep,
    OperatorUser,
    SessionDep,
    SettingsDep,
)
from ..schemas import error_responses
from . import service
from .models import SessionState
from .schemas import SessionClose, SessionCreate, SessionPublic, SessionsPublic

router = APIRouter(prefix="/api/v1/tunnel", tags=["sessions"])


@router.post(
    "/open",
    response_model=SessionPublic,
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(401, 403, 404, 409, 502, 504),
)
async def open_session(
    body: SessionCreate,
    db: SessionDep,
    bus: BusDep,
    settings: SettingsDep,
    tech: OperatorUser,
    metrics: MetricsDep,
) -> SessionPublic:
    with metrics.counting_tunnel_open():
        row = await service.open_session(
            db, bus=bus, settings=settings, agent_id=body.agent_id, tech=tech
        )
    return SessionPublic.from_row(row)


@router.post("/close", response_model=SessionPublic, responses=error_responses(401, 403, 404))
async def close_session(
    body: SessionClose, db: SessionDep, bus: BusDep, settings: SettingsDep, tech: CurrentUser
) -> SessionPublic:
    row = await service.close_session(
        db, bus=bus, settings=settings, session_id=body.session_id, tech=tech
    )
    return SessionPublic.from_row(row)


@router.get(
    "/status/{session_id}", response_model=SessionPublic, responses=error_responses(401, 404)
)
async def session_status(session_id: IdPath, db: SessionDep, _: CurrentUser) -> SessionPublic:
    return SessionPublic.from_row(await service.get_session(db, session_id=session_id))


@router.get("/sessions", response_model=SessionsPublic, responses=error_responses(401))
async def list_sessions(
    db: SessionDep,
    _: CurrentUser,
    agent_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    state: SessionState | None = None,
    tech_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> SessionsPublic:
    rows, count = await service.list_sessions(
        db, agent_id=agent_id, state=state, tech_id=tech_id, limit=limit, offset=offset
    )
    return SessionsPublic(data=[SessionPublic.from_row(r) for r in rows], count=count)
