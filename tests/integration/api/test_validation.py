"""Bad input gets a documented error body, never a stack trace."""

from __future__ import annotations

import httpx
import pytest

from gurutunnel_api.config import ApiSettings
from gurutunnel_api.main import create_app

from .conftest import Api, EnrolledAgent, Users

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/tunnel/open", {"agent_id": "a.b"}),
        ("POST", "/api/v1/tunnel/open", {"agent_id": "x" * 65}),
        ("POST", "/api/v1/tunnel/open", {"agent_id": "ok", "tech_id": "someone-else"}),
        ("POST", "/api/v1/tunnel/open", {}),
        ("POST", "/api/v1/tunnel/open", ["agent_id"]),
        ("POST", "/api/v1/tunnel/close", {"session_id": "*"}),
        ("POST", "/api/v1/tunnel/close", {"session_id": 42}),
        ("GET", "/api/v1/tunnel/status/bad%20id", None),
        ("GET", "/api/v1/tunnel/status/a.b", None),
        ("GET", "/api/v1/agents/%3E", None),
        ("GET", "/api/v1/tunnel/sessions?agent_id=a.*", None),
        ("GET", "/api/v1/tunnel/sessions?state=weird", None),
        ("GET", "/api/v1/tunnel/sessions?limit=0", None),
        ("POST", "/api/v1/agents", {"name": "pc", "id": "chosen-id"}),
        ("POST", "/api/v1/agents", {"name": ""}),
        ("POST", "/api/v1/auth/token", {"username": "a", "password": "b", "role": "admin"}),
    ],
)
async def test_malformed_ids_bodies_and_extra_fields_are_422(
    api: Api, users: Users, method: str, path: str, body: object
) -> None:
    """Ids outside ID_PATTERN, wrong types, missing or extra fields: 422 validation_error."""
    resp = await api.client.request(method, path, json=body, headers=users.admin.headers)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "validation_error"
    assert error["message"]
    assert "Traceback" not in resp.text


async def test_non_json_body_is_422(api: Api, users: Users) -> None:
    """A body that is not JSON is a validation error too."""
    resp = await api.client.post(
        "/api/v1/tunnel/open",
        content=b"{not json",
        headers={**users.admin.headers, "Content-Type": "application/json"},
    )
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "validation_error"


async def test_unknown_route_is_404_and_wrong_method_is_405_with_error_body(api: Api) -> None:
    """Routing errors use the same error body."""
    missing = await api.client.get("/api/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = await api.client.delete("/api/v1/tunnel/open")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


async def test_sessions_list_filters_and_pages(
    api: Api, users: Users, agent: EnrolledAgent
) -> None:
    """The list honours agent_id, state and tech_id filters and reports the full count."""
    for _ in range(3):  # no gateway: three failed sessions
        resp = await api.client.post(
            "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
        )
        assert resp.status_code == 409
    page = await api.client.get(
        "/api/v1/tunnel/sessions",
        params={"agent_id": agent.id, "state": "failed", "tech_id": users.tech.id, "limit": 2},
        headers=users.viewer.headers,
    )
    body = page.json()
    assert body["count"] == 3
    assert len(body["data"]) == 2
    none = await api.client.get(
        "/api/v1/tunnel/sessions", params={"tech_id": users.tech2.id}, headers=users.tech.headers
    )
    assert none.json() == {"data": [], "count": 0}


async def test_unexpected_exception_is_500_internal_error_without_trace(
    migrated: ApiSettings, nc: object
) -> None:
    """A bug in a handler answers 500 internal_error and never leaks the trace."""
    app = create_app(migrated)

    async def boom() -> None:
        raise RuntimeError("secret detail from deep inside")

    app.add_api_route("/boom", boom)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            resp = await client.get("/boom")
    assert resp.status_code == 500
    assert resp.json() == {"error": {"code": "internal_error", "message": "internal error"}}
    assert "secret detail" not in resp.text
