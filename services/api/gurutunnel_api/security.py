"""Passwords, technician tokens and agent credentials (claims exactly as docs/design.md).

Contract:
- ``hash_password`` / ``verify_password``: argon2id (argon2-cffi defaults). ``verify_password``
  never raises; ``dummy_verify`` spends the same time for an unknown user.
- ``PasswordHashing(concurrency)``: the same three as coroutines for request handlers; each runs
  in a worker thread (argon2 costs ~150 ms on purpose and must not stall the event loop) behind a
  semaphore of ``concurrency`` (``GT_API_PASSWORD_HASH_CONCURRENCY``), so a login flood queues
  instead of exhausting the thread pool.
- Technician token: HS256 with ``jwt_secret``; claims ``sub, role, typ="tech", iss, aud, iat, exp,
  jti``. ``decode_tech_token`` pins ``HS256``, requires ``exp, iat, iss, aud, sub``, checks
  ``typ`` and ``role`` and raises :class:`InvalidToken` for anything else (expired, tampered,
  ``alg: none``, an EdDSA agent credential, a wrong audience, ...).
- Agent credential: EdDSA (Ed25519) with the API's private key; claims ``sub=agent_id,
  typ="agent", iss, aud="gurutunnel-gateway", iat, exp, jti``. The gateway verifies it with the
  public key alone (``verify_agent_credential`` is the reference check, used by tests).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .auth.models import Role
from .db import utcnow

ISSUER = "gurutunnel"
TECH_AUDIENCE = "gurutunnel-api"
AGENT_AUDIENCE = "gurutunnel-gateway"
TECH_ALGORITHM = "HS256"
AGENT_ALGORITHM = "EdDSA"
TECH_TYP = "tech"
AGENT_TYP = "agent"
_REQUIRED = ["exp", "iat", "iss", "aud", "sub"]

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class InvalidToken(Exception):
    """A token that must not be accepted (the message is safe to log, never the token)."""


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def dummy_verify(password: str) -> None:
    """Spend one verification's time so an unknown user answers like a wrong password."""
    verify_password(_DUMMY_HASH, password)


class PasswordHashing:
    """argon2 off the event loop, at most ``concurrency`` at once (one per application)."""

    def __init__(self, concurrency: int) -> None:
        self._slots = asyncio.Semaphore(concurrency)

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(hash_password, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        async with self._slots:
            return await asyncio.to_thread(verify_password, password_hash, password)

    async def dummy_verify(self, password: str) -> None:
        """Verify against a dummy hash: an unknown user costs what a wrong password costs."""
        await self.verify(_DUMMY_HASH, password)


@dataclass(frozen=True, slots=True)
class TechClaims:
    sub: str
    role: Role
    jti: str
    exp: datetime


def mint_tech_token(
    *, secret: str, tech_id: str, role: Role, ttl_s: int, now: datetime | None = None
) -> str:
    issued = now or utcnow()
    claims: dict[str, Any] = {
        "sub": tech_id,
        "role": role.value,
        "typ": TECH_TYP,
        "iss": ISSUER,
        "aud": TECH_AUDIENCE,
        "iat": issued,
        "exp": issued + timedelta(seconds=ttl_s),
        "jti": secrets.token_hex(16),
    }
    return jwt.encode(claims, secret, algorithm=TECH_ALGORITHM)


def decode_tech_token(token: str, *, secret: str) -> TechClaims:
    """The claims of a valid technician token, else :class:`InvalidToken`."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[TECH_ALGORITHM],
            audience=TECH_AUDIENCE,
            issuer=ISSUER,
            options={"require": _REQUIRED},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(type(exc).__name__) from None
    if claims.get("typ") != TECH_TYP:
        raise InvalidToken("not a technician token")
    try:
        role = Role(str(claims.get("role")))
    except ValueError:
        raise InvalidToken("unknown role") from None
    sub, jti, exp = claims["sub"], claims.get("jti", ""), claims["exp"]
    if not isinstance(sub, str) or not isinstance(jti, str) or not isinstance(exp, int | float):
        raise InvalidToken("malformed claims")
    return TechClaims(sub=sub, role=role, jti=jti, exp=datetime.fromtimestamp(exp, tz=UTC))


# agent credentials


def generate_agent_keypair() -> tuple[bytes, bytes]:
    """A fresh Ed25519 pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def load_agent_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read the Ed25519 private key; ``ValueError`` when the file is not one."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def mint_agent_credential(
    *, key: Ed25519PrivateKey, agent_id: str, ttl_s: int, now: datetime | None = None
) -> str:
    issued = now or utcnow()
    claims: dict[str, Any] = {
        "sub": agent_id,
        "typ": AGENT_TYP,
        "iss": ISSUER,
        "aud": AGENT_AUDIENCE,
        "iat": issued,
        "exp": issued + timedelta(seconds=ttl_s),
        "jti": secrets.token_hex(16),
    }
    return jwt.encode(claims, key, algorithm=AGENT_ALGORITHM)


def verify_agent_credential(token: str, *, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The gateway's check: EdDSA pinned, gateway audience, ``typ="agent"``."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            public_key,
            algorithms=[AGENT_ALGORITHM],
            audience=AGENT_AUDIENCE,
            issuer=ISSUER,
            options={"require": _REQUIRED},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(type(exc).__name__) from None
    if claims.get("typ") != AGENT_TYP:
        raise InvalidToken("not an agent credential")
    return claims
