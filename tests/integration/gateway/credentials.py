"""Agent credential helpers for tests: an Ed25519 key pair and ``mint_agent_credential``.

The claims follow docs/design.md "Credentials"; ``**overrides`` replaces a claim, and an
override of ``None`` removes it (to test a missing ``exp``, ``iat``, ...).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def generate_agent_key() -> tuple[Ed25519PrivateKey, str]:
    """A fresh Ed25519 private key and the PEM of its public key."""
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return private_key, pem.decode("ascii")


def agent_claims(agent_id: str, **overrides: Any) -> dict[str, Any]:
    """Valid agent credential claims (1 hour), with ``overrides`` applied (None removes)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": agent_id,
        "typ": "agent",
        "iss": "gurutunnel",
        "aud": "gurutunnel-gateway",
        "iat": now,
        "exp": now + 3600,
        "jti": uuid.uuid4().hex,
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def mint_agent_credential(private_key: Ed25519PrivateKey, agent_id: str, **overrides: Any) -> str:
    """An EdDSA-signed agent credential, as the API issues it."""
    return jwt.encode(agent_claims(agent_id, **overrides), private_key, algorithm="EdDSA")
