"""``GET /api/v1/audit`` (admin): the audit log, filtered and paged."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from gurutunnel_protocol import ID_PATTERN

from ..deps import AdminUser, SessionDep
from ..schemas import error_responses
from . import service
from .schemas import AuditPublic, AuditsPublic

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=AuditsPublic, responses=error_responses(401, 403))
async def list_audit(
    db: SessionDep,
    _: AdminUser,
    agent_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    session_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> AuditsPublic:
    rows, count = await service.list_audit(
        db, agent_id=agent_id, session_id=session_id, action=action, limit=limit, offset=offset
    )
    return AuditsPublic(data=[AuditPublic.from_row(r) for r in rows], count=count)
