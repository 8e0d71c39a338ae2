"""Request dependencies with typed aliases: settings, database session, bus, the caller.

``CurrentUser`` authenticates the ``Authorization: Bearer`` technician token and reloads the
technician (a disabled or deleted account stops working at once, and the role comes from the
database, not from the token). ``AdminUser`` and ``OperatorUser`` (admin or tech) add the role
guard; a missing or bad token is 401 ``unauthorized``, a role too weak 403 ``forbidden``.
``MetricsDep`` is the app's :class:`.metrics.ApiMetrics`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from gurutunnel_protocol import ID_PATTERN

from .auth.models import Role, Technician
from .bus import Bus
from .config import ApiSettings
from .errors import Forbidden, ServiceUnavailable, Unauthorized
from .metrics import ApiMetrics
from .security import InvalidToken, PasswordHashing, decode_tech_token

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="technician JWT")


def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessionmaker() as session:
        yield session


def get_bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


def get_metrics(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


def get_passwords(request: Request) -> PasswordHashing:
    passwords: PasswordHashing = request.app.state.passwords
    return passwords


def get_agent_signing_key(request: Request) -> Ed25519PrivateKey:
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
    async with db.begin():
        tech = await db.get(Technician, claims.sub)
    if tech is None or tech.disabled:
        log.info("technician token refused: unknown or disabled account")
        raise Unauthorized("invalid or expired token")
    return tech


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
