"""Technician accounts and token issue."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from gurutunnel_protocol import new_id

from ..config import ApiSettings
from ..errors import Conflict, NotFound, Unauthorized
from ..security import PasswordHashing, mint_tech_token
from .models import Role, Technician, permissions_for_role
from .schemas import TechnicianUpdate, TokenPublic

log = logging.getLogger(__name__)


async def issue_token(
    db: AsyncSession,
    *,
    settings: ApiSettings,
    passwords: PasswordHashing,
    username: str,
    password: str,
) -> TokenPublic:
    """A token for valid credentials; one identical 401 for unknown user, wrong password or
    disabled account (and the same argon2 cost for each, spent in a worker thread)."""
    async with db.begin():
        tech = await db.scalar(select(Technician).where(col(Technician.username) == username))
    if tech is None:
        await passwords.dummy_verify(password)
        log.info("token refused: bad credentials")
        raise Unauthorized("invalid username or password")
    if not await passwords.verify(tech.password_hash, password) or tech.disabled:
        log.info("token refused: bad credentials")
        raise Unauthorized("invalid username or password")
    token = mint_tech_token(
        secret=settings.jwt_secret.get_secret_value(),
        tech_id=tech.id,
        role=Role(tech.role),
        ttl_s=settings.jwt_ttl_s,
    )
    return TokenPublic(access_token=token, expires_in=settings.jwt_ttl_s)


async def upsert_technician(
    db: AsyncSession, *, passwords: PasswordHashing, username: str, password: str, role: Role
) -> Technician:
    """Create the technician, or reset its password and role and re-enable it (idempotent)."""
    # hashed before the transaction: argon2 must not hold SQLite's write lock
    new_hash = await passwords.hash(password)
    async with db.begin():
        tech = await db.scalar(select(Technician).where(col(Technician.username) == username))
        if tech is None:
            tech = Technician(id=new_id(), username=username, password_hash=new_hash, role=role)
            db.add(tech)
        else:
            if not await passwords.verify(tech.password_hash, password):
                tech.password_hash = new_hash
            tech.role = role.value
            tech.disabled = False
        tech.can_upload, tech.can_download = permissions_for_role(
            role, can_upload=tech.can_upload, can_download=tech.can_download
        )
    return tech


async def create_technician(
    db: AsyncSession,
    *,
    passwords: PasswordHashing,
    username: str,
    password: str,
    role: Role,
    can_upload: bool | None = None,
    can_download: bool | None = None,
) -> Technician:
    """Create a technician; 409 ``conflict`` when the username is taken (the unique index
    decides, so concurrent creations cannot both succeed). File permissions: see
    :func:`.models.permissions_for_role`."""
    upload, download = permissions_for_role(role, can_upload=can_upload, can_download=can_download)
    tech = Technician(
        id=new_id(),
        username=username,
        password_hash=await passwords.hash(password),
        role=role.value,
        can_upload=upload,
        can_download=download,
    )
    try:
        async with db.begin():
            db.add(tech)
    except IntegrityError:
        raise Conflict("username is taken") from None
    return tech


async def update_technician(
    db: AsyncSession, *, user_id: str, changes: TechnicianUpdate
) -> Technician:
    """Apply ``changes`` (only the fields given); 404 ``not_found`` for no such technician.
    The file permissions are normalised for the resulting role (admin both, viewer neither)."""
    async with db.begin():
        tech = await db.get(Technician, user_id, with_for_update=True)
        if tech is None:
            raise NotFound("technician not found")
        role = changes.role if changes.role is not None else Role(tech.role)
        tech.role = role.value
        if changes.disabled is not None:
            tech.disabled = changes.disabled
        tech.can_upload, tech.can_download = permissions_for_role(
            role,
            can_upload=tech.can_upload if changes.can_upload is None else changes.can_upload,
            can_download=(
                tech.can_download if changes.can_download is None else changes.can_download
            ),
        )
    return tech
