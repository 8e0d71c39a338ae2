"""Request dependencies with typed aliases: settings, database session, bus, the caller.

``CurrentUser`` authenticates the ``Authorization: Bearer`` technician token and reloads the
technician on every request, never cached (a disabled or deleted account stops working at
once, and the role comes from the database, not from the token); the reload is one read that
does not take SQLite's write lock (:func:`.db.unlocked`) and the ``Technician`` it returns is a
copy of the row, attached to no database session. ``AdminUser`` and ``OperatorUser``
(admin or tech) add the role guard; a missing or bad token is 401 ``unauthorized``, a role
too weak 403 ``forbidden``. ``MetricsDep`` is the app's :class:`.metrics.ApiMetrics`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from gurutunnel_protocol import ID_PATTERN

from .auth.models import Role, Technician
from .bus import Bus
from .config import ApiSettings
from .db import unlocked
from .errors import Forbidden, ServiceUnavailable, Unauthorized
from .metrics import ApiMetrics
from .security import InvalidToken, PasswordHashing, decode_tech_token

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="technician JWT")

# The providers below only read ``app.state``, and are ``async def`` for that reason: FastAPI
# runs a plain ``def`` dependency in its thread pool, a thread hop per dependency per request.


async def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessionmaker() as session:
        yield session


async def get_bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


async def get_metrics(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


async def get_passwords(request: Request) -> PasswordHashing:
    passwords: PasswordHashing = request.app.state.passwords
    return passwords


async def get_agent_signing_key(request: Request) -> Ed25519PrivateKey:
    key: Ed25519PrivateKey | None = request.app.state.agent_signing_key
    if key is None:
        raise ServiceUnavailable(
            "agent signing key is not configured (GT_API_AGENT_SIGNING_KEY_FILE)"
        )
    return key


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_db)]
BusDep = Annotated[Bus, Depends(get_bus)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]
PasswordsDep = Annotated[PasswordHashing, Depends(get_passwords)]
SigningKeyDep = Annotated[Ed25519PrivateKey, Depends(get_agent_signing_key)]
IdPath = Annotated[str, Path(pattern=ID_PATTERN, description="a subject-safe id")]


# built once: SQLAlchemy memoizes a statement's cache key on it
_TECHNICIAN_ROW = select(*Technician.metadata.tables["technician"].columns).where(
    col(Technician.id) == bindparam("tech_id_")
)


async def get_current_user(
    db: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Technician:
    if credentials is None:
        raise Unauthorized("missing bearer token")
    try:
        claims = decode_tech_token(
            credentials.credentials, secret=settings.jwt_secret.get_secret_value()
        )
    except InvalidToken as exc:
        # the reason is the exception class (safe); never the token
        log.info("technician token refused", extra={"error": str(exc)})
        raise Unauthorized("invalid or expired token") from None
    # one read: on SQLite no BEGIN IMMEDIATE (it would queue behind every writer); a Core row,
    # not an ORM load (every authenticated request pays for it)
    async with unlocked(db):
        found = (
            await (await db.connection()).execute(_TECHNICIAN_ROW, {"tech_id_": claims.sub})
        ).first()
    if found is None or found.disabled:
        log.info("technician token refused: unknown or disabled account")
        raise Unauthorized("invalid or expired token")
    return Technician(**found._mapping)


CurrentUser = Annotated[Technician, Depends(get_current_user)]


def require_roles(*roles: Role) -> Callable[[Technician], Coroutine[Any, Any, Technician]]:
    """A dependency that lets only ``roles`` through (403 otherwise)."""
    allowed = frozenset(roles)

    async def guard(tech: CurrentUser) -> Technician:
        if Role(tech.role) not in allowed:
            raise Forbidden("your role may not do this")
        return tech

    return guard


AdminUser = Annotated[Technician, Depends(require_roles(Role.ADMIN))]
OperatorUser = Annotated[Technician, Depends(require_roles(Role.ADMIN, Role.TECH))]
