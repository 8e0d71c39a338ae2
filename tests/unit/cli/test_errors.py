"""Error rendering and exit codes: API errors, auth errors, network errors, remote exit reasons."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from gurutunnel_cli.client import ApiClient
from gurutunnel_cli.errors import ApiError, AuthError, NetworkError, exit_code_for
from gurutunnel_cli.main import app


@pytest.mark.parametrize(
    ("reason", "code", "expected"),
    [
        ("exited", 0, 0),
        ("exited", 3, 3),
        ("exited", 255, 255),
        ("exited", 256, 255),
        ("exited", -9, 137),
        ("exited", -15, 143),
        ("exited", None, 255),
        ("timeout", None, 124),
        ("cancelled", None, 130),
        ("spawn_failed", None, 127),
        ("session_closed", None, 255),
        ("something_new", 0, 255),
    ],
)
def test_exit_reason_maps_to_documented_exit_code(
    reason: str, code: int | None, expected: int
) -> None:
    """Each exit reason (and signal deaths) gives the exit code the CLI documents."""
    assert exit_code_for(reason, code) == expected


def _client(handler: Any) -> ApiClient:
    return ApiClient("http://api.test", "tok", transport=httpx.MockTransport(handler))


async def test_api_error_body_becomes_api_error_with_its_code_and_message() -> None:
    """A {"error": {code, message}} answer raises ApiError rendered as 'gurutunnel: code: msg'."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer tok"
        return httpx.Response(409, json={"error": {"code": "agent_offline", "message": "gone"}})

    async with _client(handler) as c:
        with pytest.raises(ApiError) as info:
            await c.open_session("a1")
    assert info.value.status == 409 and info.value.exit_code == 1
    assert info.value.render() == "gurutunnel: agent_offline: gone"


async def test_401_becomes_auth_error_with_exit_3_and_login_hint() -> None:
    """The API refusing the token gives AuthError (exit 3) that says to run gurutunnel login."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "expired"}})

    async with _client(handler) as c:
        with pytest.raises(AuthError) as info:
            await c.agents()
    assert info.value.exit_code == 3
    assert info.value.render().startswith("gurutunnel: unauthorized: ")
    assert "run gurutunnel login" in info.value.render()


async def test_non_json_error_body_is_still_rendered() -> None:
    """A proxy's HTML 502 becomes code http_502 with the body's text, not a crash."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="Bad Gateway from proxy")

    async with _client(handler) as c:
        with pytest.raises(ApiError) as info:
            await c.agents()
    assert info.value.code == "http_502" and "Bad Gateway" in info.value.message


async def test_network_error_names_the_url() -> None:
    """A refused connection raises NetworkError naming the URL that failed."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with _client(handler) as c:
        with pytest.raises(NetworkError) as info:
            await c.session_status("s1")
    assert info.value.url == "http://api.test/api/v1/tunnel/status/s1"
    assert "http://api.test/api/v1/tunnel/status/s1" in info.value.render()


async def test_timeout_is_a_network_error_naming_the_bound() -> None:
    """An API that does not answer in time gives NetworkError with the timeout in the message."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with _client(handler) as c:
        with pytest.raises(NetworkError) as info:
            await c.agents()
    assert "30s" in info.value.message


# ------------------------------------------------------------------ the CLI, in process
class CannedApi:
    """A real local HTTP server answering every request with one canned (status, body)."""

    def __init__(self) -> None:
        self.status = 200
        self.body: Any = {}
        self.requests: list[tuple[str, str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length).decode() if length else ""
                api.requests.append((self.command, self.path, payload))
                raw = json.dumps(api.body).encode()
                self.send_response(api.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def canned() -> Iterator[CannedApi]:
    api = CannedApi()
    thread = threading.Thread(target=api.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api.server.shutdown()
        api.server.server_close()


def _env(canned: CannedApi, tmp_path: Path) -> dict[str, str]:
    return {
        "GT_CLI_API_URL": canned.url,
        "GT_CLI_TOKEN": "tok",
        "XDG_CONFIG_HOME": str(tmp_path),
    }


def test_cli_prints_api_error_as_one_line_and_exits_1(canned: CannedApi, tmp_path: Path) -> None:
    """An API refusal prints exactly 'gurutunnel: <code>: <message>' on stderr, exit 1."""
    canned.status = 409
    canned.body = {"error": {"code": "session_exists", "message": "agent has a session"}}
    result = CliRunner().invoke(app, ["open", "a1"], env=_env(canned, tmp_path))
    assert result.exit_code == 1
    assert result.stderr == "gurutunnel: session_exists: agent has a session\n"
    assert result.stdout == ""
    assert canned.requests == [("POST", "/api/v1/tunnel/open", '{"agent_id":"a1"}')]


def test_cli_rejected_token_exits_3(canned: CannedApi, tmp_path: Path) -> None:
    """A 401 from the API exits 3 with the login hint."""
    canned.status = 401
    canned.body = {"error": {"code": "unauthorized", "message": "token expired"}}
    result = CliRunner().invoke(app, ["agents"], env=_env(canned, tmp_path))
    assert result.exit_code == 3
    assert "run gurutunnel login" in result.stderr and "Traceback" not in result.output


def test_cli_unreachable_api_names_the_url(tmp_path: Path) -> None:
    """With nothing listening, the CLI says which URL failed, exit 1, no traceback."""
    env = {"GT_CLI_API_URL": "http://127.0.0.1:9", "GT_CLI_TOKEN": "t"}
    result = CliRunner().invoke(app, ["sessions"], env={**env, "XDG_CONFIG_HOME": str(tmp_path)})
    assert result.exit_code == 1
    assert result.stderr.startswith("gurutunnel: network_error: http://127.0.0.1:9/api/v1/")
    assert "Traceback" not in result.output


def test_cli_open_prints_the_session_id_alone_on_stdout(canned: CannedApi, tmp_path: Path) -> None:
    """open: the id alone on stdout (for $(...)), details on stderr."""
    canned.status = 201
    canned.body = {"id": "s123", "state": "active", "agent_id": "a1", "gateway_id": "gw1"}
    result = CliRunner().invoke(app, ["open", "a1"], env=_env(canned, tmp_path))
    assert result.exit_code == 0
    assert result.stdout == "s123\n"
    assert "active" in result.stderr


def test_cli_agents_json_prints_the_api_json(canned: CannedApi, tmp_path: Path) -> None:
    """agents --json prints the API's JSON; the table shows id, name, online, host and os."""
    canned.body = {
        "data": [
            {
                "id": "a" * 32,
                "name": "box",
                "online": True,
                "last_seen_at": "2024-05-01T10:00:00Z",
                "metrics": {"hostname": "host-1", "os": "Linux"},
            }
        ],
        "count": 1,
    }
    env = _env(canned, tmp_path)
    as_json = CliRunner().invoke(app, ["agents", "--json"], env=env)
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == canned.body
    table = CliRunner().invoke(app, ["agents"], env=env)
    assert table.exit_code == 0
    for text in ("a" * 32, "box", "yes", "host-1", "Linux", "2024-05-01 10:00:00"):
        assert text in table.stdout


def test_cli_sessions_passes_filters(canned: CannedApi, tmp_path: Path) -> None:
    """sessions --agent/--state become the API's agent_id/state query parameters."""
    canned.body = {"data": [], "count": 0}
    result = CliRunner().invoke(
        app, ["sessions", "--agent", "a1", "--state", "active"], env=_env(canned, tmp_path)
    )
    assert result.exit_code == 0
    assert canned.requests[0][1] == "/api/v1/tunnel/sessions?agent_id=a1&state=active"


def test_cli_exec_needs_exactly_one_of_argv_and_sh(tmp_path: Path) -> None:
    """exec with both argv and --sh (or neither) is a usage error, exit 2, nothing sent."""
    env = {"GT_CLI_API_URL": "http://127.0.0.1:9", "GT_CLI_TOKEN": "t"}
    both = CliRunner().invoke(app, ["exec", "s1", "--sh", "ls", "--", "ls"], env=env)
    neither = CliRunner().invoke(app, ["exec", "s1"], env=env)
    assert both.exit_code == 2 and neither.exit_code == 2
    assert "exactly one" in both.stderr
