"""Technician accounts and token issue."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from gurutunnel_protocol import new_id

from ..config import ApiSettings
from ..errors import Conflict, Unauthorized
from ..security import PasswordHashing, mint_tech_token
from .models import Role, Technician
from .schemas import TokenPublic

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
    return tech


async def create_technician(
    db: AsyncSession, *, passwords: PasswordHashing, username: str, password: str, role: Role
) -> Technician:
    """Create a technician; 409 ``conflict`` when the username is taken (the unique index
    decides, so concurrent creations cannot both succeed)."""
    tech = Technician(
        id=new_id(),
        username=username,
        password_hash=await passwords.hash(password),
        role=role.value,
    )
    try:
        async with db.begin():
            db.add(tech)
    except IntegrityError:
        raise Conflict("username is taken") from None
    return tech
