"""Tokens and passwords: what is accepted and everything that is refused."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from datetime import timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gurutunnel_api import security
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


class _SlowVerify:
    """Stands in for argon2's verify: records the threads and the overlap of its calls."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0
        self.threads: set[str] = set()

    def __call__(self, password_hash: str, password: str) -> bool:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.threads.add(threading.current_thread().name)
        time.sleep(self.hold_s)
        with self.lock:
            self.running -= 1
        return password == PASSWORD


async def test_password_checks_do_not_stall_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Verifications run in worker threads: the loop keeps ticking while they work."""
    slow = _SlowVerify(hold_s=0.3)
    monkeypatch.setattr(security, "verify_password", slow)
    passwords = PasswordHashing(2)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    tick = asyncio.create_task(ticker())
    results = await asyncio.gather(passwords.verify("h", PASSWORD), passwords.verify("h", "x"))
    stop.set()
    await tick
    assert list(results) == [True, False]
    assert threading.main_thread().name not in slow.threads
    # 0.3 s of work on the loop would allow no tick at all; off the loop it allows ~30
    assert ticks >= 5, ticks


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_password_hashing_concurrency_is_bounded_by_the_setting(
    monkeypatch: pytest.MonkeyPatch, concurrency: int
) -> None:
    """However many logins arrive at once, at most `concurrency` verifications overlap."""
    slow = _SlowVerify(hold_s=0.05)
    monkeypatch.setattr(security, "verify_password", slow)
    passwords = PasswordHashing(concurrency)
    await asyncio.gather(*(passwords.verify("h", PASSWORD) for _ in range(6)))
    assert slow.max_running == concurrency


async def test_real_argon2_verification_still_works_through_the_pool() -> None:
    """The pool calls the real argon2 verify: right password True, wrong False."""
    passwords = PasswordHashing(2)
    stored = _stored()
    assert await passwords.verify(stored, PASSWORD) is True
    assert await passwords.verify(stored, "wrong") is False
