"""No secret in any log line of the whole stack (RELIABILITY.md 13).

``tests/integration/api/test_secrets.py`` covers the API process alone; this runs the real API,
gateway and agent processes, plants known secrets (a password typed right and wrong, technician
tokens, a tampered token, the agent credential and a tampered one, a WebSocket ticket in its
URL, the output of a command and what is typed into a shell) and greps every log line of every
process, shutdown included: none may appear.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from devstack.stack import Stack
from tests.support.faults import Api, build_stack, create_admin, scan_logs

from .conftest import AGENT_ENV, API_ENV, GATEWAY_ENV

pytestmark = pytest.mark.slow

ADMIN = "admin"
PASSWORD = f"pw-{secrets.token_urlsafe(16)}"
WRONG_PASSWORD = f"wrong-{secrets.token_urlsafe(16)}"
TECH_PASSWORD = f"tech-{secrets.token_urlsafe(16)}"
# commands print these by joining two halves, so the text sent never contains them whole
OUTPUT_MARKER = f"OUTMARK{secrets.token_hex(8)}"
STDERR_MARKER = f"ERRMARK{secrets.token_hex(8)}"
SHELL_MARKER = f"SHELLMARK{secrets.token_hex(8)}"
TYPED_SECRET = f"typed-{secrets.token_hex(8)}"


def _split_print(marker: str, *, stderr: bool = False) -> str:
    half = len(marker) // 2
    return f"printf '%s%s\\n' {marker[:half]} {marker[half:]}" + (" >&2" if stderr else "")


@pytest.fixture(scope="module")
def stack(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = build_stack(
        tmp_path_factory.mktemp("log-scan"),
        nats_url=nats_url,
        database_url=None,
        subject_prefix=f"l{secrets.token_hex(4)}.gt",
        # DEBUG: the most a log can say is what is scanned
        api_env={**API_ENV, "GT_API_LOG_LEVEL": "DEBUG"},
        gateway_env={**GATEWAY_ENV, "GT_GATEWAY_LOG_LEVEL": "DEBUG"},
        agent_env={**AGENT_ENV, "GT_AGENT_LOG_LEVEL": "DEBUG"},
    )
    try:
        s.start_api()
        s.start_gateway()
        asyncio.run(create_admin(s, ADMIN, PASSWORD))
        yield s
    finally:
        s.close()


def _tampered(token: str) -> str:
    head, body, signature = token.split(".")
    flipped = "A" if signature[0] != "A" else "B"
    return f"{head}.{body}.{flipped}{signature[1:]}"


async def _ws_session(stack: Stack, api: Api, session_id: str) -> str:
    """Exec and a shell over the technician WebSocket; the ticket that was in the URL."""
    r = await api.client.post(f"/tunnel/{session_id}/ws-ticket")
    assert r.status_code == 201, r.text
    ticket: str = r.json()["ticket"]
    url = f"ws://127.0.0.1:{stack.api_port}/api/v1/tunnel/{session_id}/ws?ticket={ticket}"
    async with connect(url, open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "exec", "command": _split_print(OUTPUT_MARKER)}))
        await ws.send(json.dumps({"type": "shell", "cols": 80, "rows": 24}))
        seen, shell = b"", None
        async with asyncio.timeout(15):
            while SHELL_MARKER.encode() not in seen:
                message = json.loads(await ws.recv())
                if message["type"] == "started" and message["kind"] == "shell":
                    shell = message["channel_id"]
                    typed = f"true {TYPED_SECRET}; {_split_print(SHELL_MARKER)}\n"
                    data = base64.b64encode(typed.encode()).decode()
                    await ws.send(json.dumps({"type": "input", "channel_id": shell, "data": data}))
                elif message["type"] == "chunk" and message["channel_id"] == shell:
                    seen += base64.b64decode(message["data"])
                assert message["type"] != "error", message
        assert shell is not None
        await ws.send(json.dumps({"type": "cancel", "channel_id": shell}))
    return ticket


async def test_no_secret_reaches_any_log_line_of_api_gateway_or_agent(stack: Stack) -> None:
    """Passwords, tokens, credentials, a WebSocket ticket, command output and shell input are
    all used, right and wrong, at DEBUG; after every process stopped none of them is in any
    log file, and every file holds JSON lines."""
    async with Api.login(stack, ADMIN, PASSWORD) as api:
        async with httpx.AsyncClient(base_url=f"{stack.api_url}/api/v1", timeout=10) as anon:
            r = await anon.post("/auth/token", json={"username": ADMIN, "password": WRONG_PASSWORD})
            assert r.status_code == 401
            r = await anon.get(
                "/agents", headers={"Authorization": f"Bearer {_tampered(api.token)}"}
            )
            assert r.status_code == 401
        r = await api.client.post(
            "/users", json={"username": "tech1", "password": TECH_PASSWORD, "role": "tech"}
        )
        assert r.status_code == 201, r.text
        async with Api.login(stack, "tech1", TECH_PASSWORD) as tech:
            tech_token = tech.token
            agent = await api.enroll("scanned")
            with pytest.raises(InvalidStatus) as refused:
                await connect(
                    stack.gateway_ws_url(),
                    additional_headers={"Authorization": f"Bearer {_tampered(agent.credential)}"},
                    open_timeout=5,
                )
            assert refused.value.response.status_code == 401
            proc = stack.start_agent(agent)
            try:
                await tech.wait_online(agent.id)
                session_id = await tech.open(agent.id)
                both_streams = _split_print(STDERR_MARKER, stderr=True)
                r = await tech.client.post(
                    f"/tunnel/{session_id}/exec",
                    json={"command": f"{_split_print(OUTPUT_MARKER)}; {both_streams}"},
                )
                assert r.status_code == 200, r.text
                assert OUTPUT_MARKER in r.json()["stdout"] and STDERR_MARKER in r.json()["stderr"]
                async with tech.client.stream(
                    "POST",
                    f"/tunnel/{session_id}/exec",
                    json={"command": _split_print(OUTPUT_MARKER)},
                    params={"stream": "true"},
                ) as streamed:
                    body = b"".join([chunk async for chunk in streamed.aiter_bytes()])
                assert base64.b64encode(f"{OUTPUT_MARKER}\n".encode()) in body
                ticket = await _ws_session(stack, tech, session_id)
                r = await tech.client.post("/tunnel/close", json={"session_id": session_id})
                assert r.status_code == 200, r.text
            finally:
                proc.stop()
    await asyncio.to_thread(stack.close)  # every process logs its shutdown too

    planted = {
        "admin password": PASSWORD,
        "wrong password": WRONG_PASSWORD,
        "tech password": TECH_PASSWORD,
        "admin token": api.token,
        "tech token": tech_token,
        "tampered token": _tampered(api.token),
        "token signature": api.token.rsplit(".", 1)[1],
        "agent credential": agent.credential,
        "tampered credential": _tampered(agent.credential),
        "credential signature": agent.credential.rsplit(".", 1)[1],
        "websocket ticket": ticket,
        "jwt secret": stack.jwt_secret,
        "command output": OUTPUT_MARKER,
        "command stderr": STDERR_MARKER,
        "shell output": SHELL_MARKER,
        "shell input": TYPED_SECRET,
    }
    logs = sorted(stack.logs.glob("*.log"))
    assert {p.name for p in logs} >= {"api.log", "gateway-gw1.log", "agent-scanned.log"}
    assert scan_logs(logs, planted) == []
    for path in logs:
        lines = path.read_text().splitlines()
        assert lines, f"{path.name} is empty"
        for line in lines:
            json.loads(line)  # every line is one JSON object
