"""Technician accounts and token issue."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from gurutunnel_protocol import new_id

from ..config import ApiSettings
from ..errors import Conflict, Unauthorized
from ..security import dummy_verify, hash_password, mint_tech_token, verify_password
from .models import Role, Technician
from .schemas import TokenPublic


async def issue_token(
    db: AsyncSession, *, settings: ApiSettings, username: str, password: str
) -> TokenPublic:
    """A token for valid credentials; one identical 401 for unknown user, wrong password or
    disabled account (and the same argon2 cost for each)."""
    async with db.begin():
        tech = await db.scalar(select(Technician).where(col(Technician.username) == username))
    if tech is None:
        dummy_verify(password)
        raise Unauthorized("invalid username or password")
    if not verify_password(tech.password_hash, password) or tech.disabled:
        raise Unauthorized("invalid username or password")
    token = mint_tech_token(
        secret=settings.jwt_secret.get_secret_value(),
        tech_id=tech.id,
        role=Role(tech.role),
        ttl_s=settings.jwt_ttl_s,
    )
    return TokenPublic(access_token=token, expires_in=settings.jwt_ttl_s)


async def upsert_technician(
    db: AsyncSession, *, username: str, password: str, role: Role
) -> Technician:
    """Create the technician, or reset its password and role and re-enable it (idempotent)."""
    async with db.begin():
        tech = await db.scalar(select(Technician).where(col(Technician.username) == username))
        if tech is None:
            tech = Technician(
                id=new_id(), username=username, password_hash=hash_password(password), role=role
            )
            db.add(tech)
        else:
            if not verify_password(tech.password_hash, password):
                tech.password_hash = hash_password(password)
            tech.role = role.value
            tech.disabled = False
    return tech


async def create_technician(
    db: AsyncSession, *, username: str, password: str, role: Role
) -> Technician:
    """Create a technician; 409 ``conflict`` when the username is taken (the unique index
    decides, so concurrent creations cannot both succeed)."""
    tech = Technician(
        id=new_id(), username=username, password_hash=hash_password(password), role=role.value
    )
    try:
        async with db.begin():
            db.add(tech)
    except IntegrityError:
        raise Conflict("username is taken") from None
    return tech
