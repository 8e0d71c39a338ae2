"""Agent credential verification, done before the WebSocket upgrade.

Contract (docs/design.md "Credentials"):
- The credential is a JWT signed with Ed25519 by the API. ``CredentialVerifier.verify`` pins
  ``algorithms=["EdDSA"]``, requires ``exp, iat, iss, aud, sub``, checks ``iss == "gurutunnel"``,
  ``aud == "gurutunnel-gateway"``, ``typ == "agent"`` and that ``sub`` is a subject-safe id.
- A credential whose ``iat`` is before the agent's revocation ``not_before`` is revoked.
- Exceptions::

    CredentialError            refused credential; carries the HTTP status and ErrorCode
     +-- InvalidCredential     missing, malformed, tampered, expired, wrong type -> 401
     +-- RevokedCredential     valid but revoked -> 403

No message of these exceptions ever contains the credential itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gurutunnel_protocol import ErrorCode, InvalidIdError, validate_id

ISSUER = "gurutunnel"
AUDIENCE = "gurutunnel-gateway"
AGENT_TOKEN_TYPE = "agent"  # noqa: S105  # a claim value, not a secret
ALGORITHMS = ["EdDSA"]
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]

log = logging.getLogger(__name__)


class CredentialError(Exception):
    """A refused agent credential."""

    status: int = 401
    code: ErrorCode = ErrorCode.UNAUTHORIZED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidCredential(CredentialError):
    """Missing, malformed, tampered, expired or wrongly typed credential (HTTP 401)."""


class RevokedCredential(CredentialError):
    """A valid credential of a revoked agent (HTTP 403)."""

    status = 403
    code = ErrorCode.FORBIDDEN


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """Who an accepted credential says the agent is."""

    agent_id: str
    issued_at: datetime


def load_public_key(pem: str) -> Ed25519PublicKey:
    """Parse an Ed25519 public key PEM; raise ``ValueError`` for anything else."""
    key = load_pem_public_key(pem.encode("ascii"))
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("agent public key must be an Ed25519 public key")
    return key


def parse_not_before(value: bytes) -> datetime:
    """Parse a revocation value (ISO-8601; naive means UTC).

    An unreadable value fails closed: every credential of that agent is refused (logged).
    """
    try:
        parsed = datetime.fromisoformat(value.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        log.error("unreadable revocation value; refusing every credential of that agent")
        return datetime.max.replace(tzinfo=UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class RevocationMap:
    """agent_id -> ``not_before``: credentials issued before it are revoked."""

    def __init__(self) -> None:
        self._not_before: dict[str, datetime] = {}

    def set(self, agent_id: str, not_before: datetime) -> None:
        self._not_before[agent_id] = not_before

    def remove(self, agent_id: str) -> None:
        self._not_before.pop(agent_id, None)

    def is_revoked(self, agent_id: str, issued_at: datetime) -> bool:
        not_before = self._not_before.get(agent_id)
        return not_before is not None and issued_at < not_before

    def __len__(self) -> int:
        return len(self._not_before)


def bearer_token(authorization: str | None) -> str:
    """Extract the token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        raise InvalidCredential("missing Authorization: Bearer credential")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidCredential("Authorization header must be 'Bearer <credential>'")
    return token.strip()


class CredentialVerifier:
    """Verifies agent credentials with the API's public key alone (no database)."""

    def __init__(
        self, public_key: Ed25519PublicKey, revocations: RevocationMap, *, leeway_s: float = 0
    ) -> None:
        self._key = public_key
        self._revocations = revocations
        self._leeway_s = leeway_s

    def verify(self, token: str) -> AgentIdentity:
        """Return the identity of a valid, unrevoked credential or raise ``CredentialError``."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=ALGORITHMS,
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=self._leeway_s,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidCredential("credential expired") from None
        except jwt.PyJWTError as exc:
            # PyJWT messages name the failed check, never the token
            raise InvalidCredential(f"invalid credential: {exc}"[:200]) from None
        except (ValueError, TypeError):
            raise InvalidCredential("invalid credential") from None
        if claims.get("typ") != AGENT_TOKEN_TYPE:
            raise InvalidCredential("credential is not an agent credential")
        try:
            agent_id = validate_id(claims["sub"], what="agent id (sub)")
        except InvalidIdError as exc:
            raise InvalidCredential(exc.message) from None
        iat = claims["iat"]
        if not isinstance(iat, int | float):
            raise InvalidCredential("iat must be a number")
        issued_at = datetime.fromtimestamp(iat, tz=UTC)
        if self._revocations.is_revoked(agent_id, issued_at):
            raise RevokedCredential("agent credential revoked")
        return AgentIdentity(agent_id=agent_id, issued_at=issued_at)
