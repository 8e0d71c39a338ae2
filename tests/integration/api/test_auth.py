"""Technician authentication: token issue and every way a bearer token is refused."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import jwt
import pytest

from gurutunnel_api.auth.models import Role
from gurutunnel_api.db import utcnow
from gurutunnel_api.security import mint_tech_token

from .conftest import JWT_SECRET, PASSWORD, Api, EnrolledAgent, Users

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _b64(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


async def test_token_is_issued_for_valid_credentials_and_works(api: Api, users: Users) -> None:
    """Right username and password: a bearer token that authenticates the next request."""
    resp = await api.client.post(
        "/api/v1/auth/token", json={"username": "tech", "password": PASSWORD}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == api.settings.jwt_ttl_s
    claims = jwt.decode(
        body["access_token"], JWT_SECRET, algorithms=["HS256"], audience="gurutunnel-api"
    )
    assert (claims["sub"], claims["role"], claims["typ"], claims["iss"]) == (
        users.tech.id,
        "tech",
        "tech",
        "gurutunnel",
    )
    assert {"iat", "exp", "jti"} <= claims.keys()
    listed = await api.client.get(
        "/api/v1/agents", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert listed.status_code == 200


async def test_unknown_user_and_wrong_password_get_the_same_401(api: Api, users: Users) -> None:
    """No way to tell an unknown user from a wrong password."""
    wrong = await api.client.post("/api/v1/auth/token", json={"username": "tech", "password": "x"})
    unknown = await api.client.post(
        "/api/v1/auth/token", json={"username": "nobody", "password": "x"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.json()["error"]["code"] == "unauthorized"


def _bad_tokens(agent: EnrolledAgent, users: Users) -> dict[str, str | None]:
    now = utcnow()
    good = users.tech.token
    header, payload, signature = good.split(".")
    claims = jwt.decode(good, JWT_SECRET, algorithms=["HS256"], audience="gurutunnel-api")
    base = {
        "sub": users.tech.id,
        "role": "tech",
        "typ": "tech",
        "iss": "gurutunnel",
        "aud": "gurutunnel-api",
        "iat": now,
        "exp": now + timedelta(minutes=5),
        "jti": "j",
    }
    return {
        "missing": None,
        "garbage": "not-a-jwt",
        "expired": mint_tech_token(
            secret=JWT_SECRET,
            tech_id=users.tech.id,
            role=Role.TECH,
            ttl_s=60,
            now=now - timedelta(hours=1),
        ),
        "tampered": f"{header}.{_b64({**claims, 'role': 'admin', 'sub': users.admin.id})}"
        f".{signature}",
        "alg_none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "wrong_secret": jwt.encode(base, "another-secret-" + "y" * 32, algorithm="HS256"),
        "wrong_aud": jwt.encode({**base, "aud": "gurutunnel-gateway"}, JWT_SECRET, "HS256"),
        "wrong_typ": jwt.encode({**base, "typ": "agent"}, JWT_SECRET, "HS256"),
        "no_exp": jwt.encode({k: v for k, v in base.items() if k != "exp"}, JWT_SECRET, "HS256"),
        "agent_credential": agent.credential,
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "garbage",
        "expired",
        "tampered",
        "alg_none",
        "wrong_secret",
        "wrong_aud",
        "wrong_typ",
        "no_exp",
        "agent_credential",
    ],
)
async def test_bad_bearer_token_is_401(
    api: Api, users: Users, agent: EnrolledAgent, case: str
) -> None:
    """Missing, expired, tampered, alg none, wrong aud/typ, or an agent credential: 401."""
    token = _bad_tokens(agent, users)[case]
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    resp = await api.client.get("/api/v1/agents", headers=headers)
    assert resp.status_code == 401, resp.text
    assert resp.json()["error"]["code"] == "unauthorized"
    assert resp.headers["www-authenticate"] == "Bearer"


async def test_viewer_reads_but_cannot_enroll_or_read_audit(api: Api, users: Users) -> None:
    """Role guards: viewer and tech may list agents; only admins enrol and read the audit."""
    assert (await api.client.get("/api/v1/agents", headers=users.viewer.headers)).status_code == 200
    for user in (users.viewer, users.tech):
        enroll = await api.client.post("/api/v1/agents", json={"name": "x"}, headers=user.headers)
        assert enroll.status_code == 403
        assert enroll.json()["error"]["code"] == "forbidden"
        audit = await api.client.get("/api/v1/audit", headers=user.headers)
        assert audit.status_code == 403


async def test_admin_creates_technicians_and_duplicates_get_409(api: Api, users: Users) -> None:
    """POST /users (admin only) creates a technician who can log in; a taken name is 409."""
    body = {"username": "newtech", "password": "long-enough-pw", "role": "tech"}
    denied = await api.client.post("/api/v1/users", json=body, headers=users.tech.headers)
    assert denied.status_code == 403
    created = await api.client.post("/api/v1/users", json=body, headers=users.admin.headers)
    assert created.status_code == 201, created.text
    assert created.json()["role"] == "tech"
    assert "password" not in created.text
    token = await api.client.post(
        "/api/v1/auth/token", json={"username": "newtech", "password": "long-enough-pw"}
    )
    assert token.status_code == 200
    again = await api.client.post("/api/v1/users", json=body, headers=users.admin.headers)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    bad_role = await api.client.post(
        "/api/v1/users", json={**body, "username": "x", "role": "root"}, headers=users.admin.headers
    )
    assert bad_role.status_code == 422
