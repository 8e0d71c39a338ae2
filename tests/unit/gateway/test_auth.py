"""Credential verification and revocation rules, without sockets."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from gurutunnel_gateway.auth import (
    CredentialVerifier,
    InvalidCredential,
    RevocationMap,
    RevokedCredential,
    bearer_token,
    load_public_key,
    parse_not_before,
)
from gurutunnel_protocol import ErrorCode
from tests.integration.gateway.credentials import (
    agent_claims,
    generate_agent_key,
    mint_agent_credential,
)


@pytest.fixture
def keys() -> tuple[object, str]:
    return generate_agent_key()


def verifier(pem: str, revocations: RevocationMap | None = None) -> CredentialVerifier:
    return CredentialVerifier(load_public_key(pem), revocations or RevocationMap())


def test_valid_credential_yields_agent_identity() -> None:
    """A valid credential gives the agent id from sub and its issue time."""
    private_key, pem = generate_agent_key()
    now = int(time.time())
    identity = verifier(pem).verify(mint_agent_credential(private_key, "agent-1", iat=now))
    assert identity.agent_id == "agent-1"
    assert identity.issued_at == datetime.fromtimestamp(now, tz=UTC)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"exp": None}, "exp"),
        ({"iat": None}, "iat"),
        ({"iss": "someone-else"}, "iss"),
        ({"aud": "gurutunnel-api"}, "Audience"),
        ({"typ": "tech"}, "not an agent credential"),
        ({"typ": None}, "not an agent credential"),
        ({"sub": "bad.id"}, "sub"),
        ({"sub": None}, "sub"),
    ],
)
def test_credential_with_bad_claims_is_invalid(overrides: dict[str, object], needle: str) -> None:
    """Missing or wrong required claims, a technician typ or an unsafe sub are refused (401)."""
    private_key, pem = generate_agent_key()
    token = mint_agent_credential(private_key, "agent-1", **overrides)
    with pytest.raises(InvalidCredential) as info:
        verifier(pem).verify(token)
    assert info.value.status == 401
    assert info.value.code == ErrorCode.UNAUTHORIZED
    assert needle in info.value.message


def test_wrong_algorithms_are_invalid() -> None:
    """HS256 (even keyed with the public PEM) and alg none are refused: EdDSA is pinned."""
    _, pem = generate_agent_key()
    claims = agent_claims("agent-1")
    for token in (
        jwt.encode(claims, "a-shared-secret-of-32-bytes-long!", "HS256"),
        jwt.encode(claims, "", algorithm="none"),
    ):
        with pytest.raises(InvalidCredential):
            verifier(pem).verify(token)


def test_error_message_never_contains_the_token() -> None:
    """A refusal message names the failed check, not the credential."""
    private_key, pem = generate_agent_key()
    token = mint_agent_credential(private_key, "agent-1", aud="elsewhere")
    with pytest.raises(InvalidCredential) as info:
        verifier(pem).verify(token)
    assert token not in info.value.message
    assert token.split(".")[1] not in str(info.value)


def test_credential_issued_before_not_before_is_revoked_and_later_one_is_not() -> None:
    """Revocation refuses credentials issued before not_before (403) and accepts newer ones."""
    private_key, pem = generate_agent_key()
    revocations = RevocationMap()
    now = int(time.time())
    revocations.set("agent-1", datetime.fromtimestamp(now - 10, tz=UTC))
    check = verifier(pem, revocations)
    with pytest.raises(RevokedCredential) as info:
        check.verify(mint_agent_credential(private_key, "agent-1", iat=now - 20))
    assert (info.value.status, info.value.code) == (403, ErrorCode.FORBIDDEN)
    assert check.verify(mint_agent_credential(private_key, "agent-1", iat=now)).agent_id
    revocations.remove("agent-1")
    assert check.verify(mint_agent_credential(private_key, "agent-1", iat=now - 20)).agent_id


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic abc", "token"])
def test_bad_authorization_header_is_invalid(header: str | None) -> None:
    """Only 'Bearer <credential>' is accepted."""
    with pytest.raises(InvalidCredential):
        bearer_token(header)


def test_bearer_token_extracts_the_credential() -> None:
    """The scheme is case-insensitive and surrounding spaces are ignored."""
    assert bearer_token("bearer  abc.def.ghi ") == "abc.def.ghi"


def test_unreadable_not_before_fails_closed() -> None:
    """An unparseable revocation value refuses every credential of the agent."""
    assert parse_not_before(b"not a date") > datetime.now(UTC) + timedelta(days=365 * 1000)
    assert parse_not_before(b"2024-01-01T00:00:00") == datetime(2024, 1, 1, tzinfo=UTC)


def test_non_ed25519_public_key_is_rejected() -> None:
    """The verifier only accepts an Ed25519 public key."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ValueError, match="Ed25519"):
        load_public_key(pem)
