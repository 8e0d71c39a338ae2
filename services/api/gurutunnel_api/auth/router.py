"""``POST /api/v1/auth/token`` (password for a short-lived technician JWT) and
``POST /api/v1/users`` (admin creates a technician of any role, with file permissions) and
``PATCH /api/v1/users/{user_id}`` (admin changes role, disabled, can_upload, can_download)."""

from __future__ import annotations

from fastapi import APIRouter, status

from ..deps import AdminUser, IdPath, PasswordsDep, SessionDep, SettingsDep
from ..schemas import error_responses
from . import service
from .schemas import (
    TechnicianCreate,
    TechnicianPublic,
    TechnicianUpdate,
    TokenPublic,
    TokenRequest,
)

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
        db,
        passwords=passwords,
        username=body.username,
        password=body.password,
        role=body.role,
        can_upload=body.can_upload,
        can_download=body.can_download,
    )
    return TechnicianPublic.from_row(tech)


@users_router.patch(
    "/{user_id}", response_model=TechnicianPublic, responses=error_responses(401, 403, 404)
)
async def update_technician(
    user_id: IdPath, body: TechnicianUpdate, db: SessionDep, _: AdminUser
) -> TechnicianPublic:
    tech = await service.update_technician(db, user_id=user_id, changes=body)
    return TechnicianPublic.from_row(tech)
