"""HTTP schemas of authentication."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

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


class TechnicianPublic(BaseModel):
    id: str
    username: str
    role: Role
    created_at: datetime
    disabled: bool

    @classmethod
    def from_row(cls, row: Technician) -> TechnicianPublic:
        return cls(
            id=row.id,
            username=row.username,
            role=Role(row.role),
            created_at=row.created_at,
            disabled=row.disabled,
        )
