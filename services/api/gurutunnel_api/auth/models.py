"""Table ``technician``: the people who open tunnels (argon2 password hash, one role)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from ..db import UTCDateTime, utcnow


class Role(StrEnum):
    """What a technician may do: admin (everything), tech (open/close own), viewer (read)."""

    ADMIN = "admin"
    TECH = "tech"
    VIEWER = "viewer"


class Technician(SQLModel, table=True):
    __tablename__ = "technician"
    __table_args__ = (sa.CheckConstraint("role IN ('admin', 'tech', 'viewer')", name="role"),)

    id: str = Field(primary_key=True, max_length=64)
    username: str = Field(max_length=64, unique=True, index=True)
    password_hash: str = Field(max_length=255)
    role: str = Field(max_length=16)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    disabled: bool = Field(default=False)
