"""Table ``technician``: the people who open tunnels (argon2 password hash, one role).

File transfer permissions are separate from the role: ``can_upload`` / ``can_download``
(defaults for a tech: download yes, upload no). An admin may always do both and a viewer
neither, whatever the columns say (:func:`may_upload`, :func:`may_download`); the service
stores them normalised for those roles (:func:`permissions_for_role`).
"""

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
    can_upload: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    can_download: bool = Field(default=True, sa_column_kwargs={"server_default": sa.true()})


def permissions_for_role(
    role: Role, *, can_upload: bool | None, can_download: bool | None
) -> tuple[bool, bool]:
    """(can_upload, can_download) to store: admins both, viewers neither, techs as asked
    (defaults: download yes, upload no)."""
    if role == Role.ADMIN:
        return True, True
    if role == Role.VIEWER:
        return False, False
    return (
        False if can_upload is None else can_upload,
        True if can_download is None else can_download,
    )


def may_upload(tech: Technician) -> bool:
    return tech.role == Role.ADMIN.value or (tech.role == Role.TECH.value and tech.can_upload)


def may_download(tech: Technician) -> bool:
    return tech.role == Role.ADMIN.value or (tech.role == Role.TECH.value and tech.can_download)
