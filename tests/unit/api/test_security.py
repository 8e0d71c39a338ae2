"""Tokens and passwords: what is accepted and everything that is refused."""

from __future__ import annotations

import asyncio
import functools
import time
from datetime import timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gurutunnel_api.auth.models import Role
from gurutunnel_api.db import utcnow
from gurutunnel_api.security import (
    InvalidToken,
    PasswordHashing,
    decode_tech_token,
    hash_password,
    mint_agent_credential,
    mint_tech_token,
    verify_agent_credential,
    verify_password,
)

SECRET = "s" * 64
PASSWORD = "pw-threaded"


@functools.cache
def _stored() -> str:
    return hash_password(PASSWORD)


def test_password_hash_verifies_only_the_right_password() -> None:
    """argon2 hashes verify the password they were made from and nothing else."""
    hashed = hash_password("pw-1")
    assert hashed.startswith("$argon2id$")
    assert verify_password(hashed, "pw-1")
    assert not verify_password(hashed, "pw-2")
    assert not verify_password("not-a-hash", "pw-1")


def test_tech_token_round_trips_with_its_claims() -> None:
    """A minted technician token decodes to its subject and role."""
    token = mint_tech_token(secret=SECRET, tech_id="t1", role=Role.VIEWER, ttl_s=60)
    claims = decode_tech_token(token, secret=SECRET)
    assert (claims.sub, claims.role) == ("t1", Role.VIEWER)
    assert claims.exp > utcnow()


def _base() -> dict[str, object]:
    now = utcnow()
    return {
        "sub": "t1",
        "role": "tech",
        "typ": "tech",
        "iss": "gurutunnel",
        "aud": "gurutunnel-api",
        "iat": now,
        "exp": now + timedelta(minutes=1),
        "jti": "j",
    }


@pytest.mark.parametrize(
    "token_factory",
    [
        pytest.param(lambda: jwt.encode({**_base(), "typ": "agent"}, SECRET, "HS256"), id="typ"),
        pytest.param(lambda: jwt.encode({**_base(), "role": "root"}, SECRET, "HS256"), id="role"),
        pytest.param(lambda: jwt.encode({**_base(), "iss": "evil"}, SECRET, "HS256"), id="iss"),
        pytest.param(
            lambda: jwt.encode({**_base(), "aud": "gurutunnel-gateway"}, SECRET, "HS256"),
            id="aud",
        ),
        pytest.param(
            lambda: jwt.encode({k: v for k, v in _base().items() if k != "iat"}, SECRET, "HS256"),
            id="no_iat",
        ),
        pytest.param(
            lambda: jwt.encode({k: v for k, v in _base().items() if k != "sub"}, SECRET, "HS256"),
            id="no_sub",
        ),
        pytest.param(
            lambda: jwt.encode(
                {**_base(), "exp": utcnow() - timedelta(seconds=5)}, SECRET, "HS256"
            ),
            id="expired",
        ),
        pytest.param(lambda: jwt.encode(_base(), SECRET, "HS512"), id="hs512"),
        pytest.param(lambda: jwt.encode(_base(), "x" * 32, "HS256"), id="other_secret"),
        pytest.param(
            lambda: jwt.encode(_base(), Ed25519PrivateKey.generate(), "EdDSA"), id="eddsa"
        ),
        pytest.param(lambda: jwt.encode(_base(), "", "none"), id="alg_none"),
        pytest.param(lambda: "a.b.c", id="garbage"),
    ],
)
def test_bad_tech_tokens_are_refused(token_factory: object) -> None:
    """Every deviation from the pinned technician token shape raises InvalidToken."""
    assert callable(token_factory)
    with pytest.raises(InvalidToken):
        decode_tech_token(token_factory(), secret=SECRET)


def test_agent_credential_verifies_with_the_public_key_only() -> None:
    """Agent credentials are EdDSA for the gateway; a technician check refuses them."""
    key = Ed25519PrivateKey.generate()
    credential = mint_agent_credential(key=key, agent_id="agent-1", ttl_s=3600)
    claims = verify_agent_credential(credential, public_key=key.public_key())
    assert (claims["sub"], claims["typ"], claims["aud"]) == (
        "agent-1",
        "agent",
        "gurutunnel-gateway",
    )
    with pytest.raises(InvalidToken):
        verify_agent_credential(credential, public_key=Ed25519PrivateKey.generate().public_key())
    with pytest.raises(InvalidToken):
        decode_tech_token(credential, secret=SECRET)
    tech = mint_tech_token(secret=SECRET, tech_id="t", role=Role.ADMIN, ttl_s=60)
    with pytest.raises(InvalidToken):
        verify_agent_credential(tech, public_key=key.public_key())


async def test_password_checks_do_not_stall_the_event_loop() -> None:
    """Two argon2 verifications run in worker threads: the loop keeps ticking meanwhile."""
    passwords = PasswordHashing(2)
    stored = _stored()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    results = await asyncio.gather(
        passwords.verify(stored, PASSWORD), passwords.verify(stored, "wrong")
    )
    elapsed = time.monotonic() - started
    stop.set()
    await tick
    assert list(results) == [True, False]
    # one verification costs far more than a tick; on the loop it would show up as a gap
    assert elapsed > 0.05, elapsed
    assert max(gaps) < elapsed / 2, (max(gaps), elapsed)


async def test_password_hashing_concurrency_is_bounded_by_the_setting() -> None:
    """With concurrency 1, two verifications run one after the other."""
    stored = _stored()
    serial = PasswordHashing(1)
    one = time.monotonic()
    await serial.verify(stored, PASSWORD)
    single = time.monotonic() - one
    started = time.monotonic()
    await asyncio.gather(serial.verify(stored, PASSWORD), serial.verify(stored, PASSWORD))
    assert time.monotonic() - started > 1.6 * single
