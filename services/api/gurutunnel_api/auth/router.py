"""``POST /api/v1/auth/token`` (password for a short-lived technician JWT) and
``POST /api/v1/users`` (admin creates a technician of any role)."""

from __future__ import annotations

from fastapi import APIRouter, status

from ..deps import AdminUser, PasswordsDep, SessionDep, SettingsDep
from ..schemas import error_responses
from . import service
from .schemas import TechnicianCreate, TechnicianPublic, TokenPublic, TokenRequest

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])
users_router = APIRouter(prefix="/api/v1/users", tags=["auth"])


@router.post("/token", response_model=TokenPublic, responses=error_responses(401))
async def issue_token(
    body: TokenRequest, db: SessionDep, settings: SettingsDep, passwords: PasswordsDep
) -> TokenPublic:
    return await service.issue_token(
        db, settings=settings, passwords=passwords, username=body.username, password=body.password
    )


@users_router.post(
    "",
    response_model=TechnicianPublic,
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(401, 403, 409),
)
async def create_technician(
    body: TechnicianCreate, db: SessionDep, passwords: PasswordsDep, _: AdminUser
) -> TechnicianPublic:
    tech = await service.create_technician(
        db, passwords=passwords, username=body.username, password=body.password, role=body.role
    )
    return TechnicianPublic.from_row(tech)
