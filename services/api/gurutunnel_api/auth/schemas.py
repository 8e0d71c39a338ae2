"""HTTP schemas of authentication."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, StrictBool

from ..schemas import RequestModel
from .models import Role, Technician


class TokenRequest(RequestModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class TokenPublic(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_in: int


class TechnicianCreate(RequestModel):
    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    password: str = Field(min_length=8, max_length=1024)
    role: Role
    can_upload: StrictBool | None = None
    """Tech only (default false); admins may always, viewers never."""
    can_download: StrictBool | None = None
    """Tech only (default true); admins may always, viewers never."""


class TechnicianUpdate(RequestModel):
    """``PATCH /users/{user_id}``: only the fields given change."""

    can_upload: StrictBool | None = None
    can_download: StrictBool | None = None
    role: Role | None = None
    disabled: StrictBool | None = None


class TechnicianPublic(BaseModel):
    id: str
    username: str
    role: Role
    created_at: datetime
    disabled: bool
    can_upload: bool
    can_download: bool

    @classmethod
    def from_row(cls, row: Technician) -> TechnicianPublic:
        return cls(
            id=row.id,
            username=row.username,
            role=Role(row.role),
            created_at=row.created_at,
            disabled=row.disabled,
            can_upload=row.can_upload,
            can_download=row.can_download,
        )
