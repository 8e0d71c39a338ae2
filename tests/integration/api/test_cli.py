"""The installed ``gurutunnel-api`` command: keygen, migrate, create-admin, and a real
uvicorn ``serve`` subprocess answering over TCP."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import time
from pathlib import Path

import httpx
from nats.aio.client import Client as NatsClient

from tests.support.services import free_port

from .conftest import JWT_SECRET

CLI = str(Path(sys.executable).parent / "gurutunnel-api")


async def run_cli(
    *args: str, env: dict[str, str], stdin: bytes | None = None, timeout_s: float = 30
) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_cli_keygen_migrate_create_admin_and_serve_work_end_to_end(
    tmp_path: Path, nats_url: str, subject_prefix: str, nc: NatsClient
) -> None:
    """keygen refuses to overwrite, create-admin is idempotent, serve answers real HTTP and
    exits cleanly on SIGTERM."""
    private, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    port = free_port()
    env = {
        **os.environ,
        "GT_API_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'api.db'}",
        "GT_API_NATS_URL": nats_url,
        "GT_API_SUBJECT_PREFIX": subject_prefix,
        "GT_API_JWT_SECRET": JWT_SECRET,
        "GT_API_PORT": str(port),
        "GT_API_AGENT_SIGNING_KEY_FILE": str(private),
    }
    code, out = await run_cli("keygen", "--private", str(private), "--public", str(public), env=env)
    assert code == 0, out
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key_before = private.read_bytes()
    code, out = await run_cli("keygen", "--private", str(private), "--public", str(public), env=env)
    assert code == 1
    assert "refusing to overwrite" in out
    assert private.read_bytes() == key_before

    code, out = await run_cli("migrate", env=env)
    assert code == 0, out
    code, out = await run_cli(
        "create-admin", "--username", "root", env={**env, "GT_ADMIN_PASSWORD": "first-password"}
    )
    assert code == 0, out
    code, out = await run_cli(
        "create-admin", "--username", "root", "--password-stdin", env=env, stdin=b"second-pw\n"
    )
    assert code == 0, out
    code, out = await run_cli("create-admin", "--username", "root", env=env)
    assert code == 2
    assert "no password" in out

    server = await asyncio.create_subprocess_exec(
        CLI, "serve", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.returncode is None, "serve exited early"
                assert time.monotonic() < deadline, "serve did not become ready"
                await asyncio.sleep(0.1)
            old = await client.post(
                "/api/v1/auth/token", json={"username": "root", "password": "first-password"}
            )
            assert old.status_code == 401
            token = await client.post(
                "/api/v1/auth/token", json={"username": "root", "password": "second-pw"}
            )
            assert token.status_code == 200, token.text
            headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
            enrolled = await client.post("/api/v1/agents", json={"name": "pc"}, headers=headers)
            assert enrolled.status_code == 201, enrolled.text
            offline = await client.post(
                "/api/v1/tunnel/open",
                json={"agent_id": enrolled.json()["agent"]["id"]},
                headers=headers,
            )
            assert offline.status_code == 409
            assert offline.json()["error"]["code"] == "agent_offline"
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
        out_bytes, _ = await asyncio.wait_for(server.communicate(), 15)
    log = out_bytes.decode()
    # uvicorn re-raises the signal after its graceful shutdown
    assert server.returncode in (0, -signal.SIGTERM), log[-2000:]
    assert "Application shutdown complete" in log
    assert "Traceback" not in log
