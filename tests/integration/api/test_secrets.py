"""Secrets stay out of logs and errors: JSON log lines of a real ``gurutunnel-api serve``
process, database errors without bound parameters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client as NatsClient
from sqlalchemy.exc import IntegrityError

from gurutunnel_api.auth.models import Role, Technician
from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine, make_sessionmaker
from gurutunnel_protocol import new_id
from tests.support.services import free_port

from .conftest import JWT_SECRET, PASSWORD, wait_until
from .test_cli import CLI, run_cli


async def test_database_errors_carry_no_bound_parameters(migrated: ApiSettings) -> None:
    """An IntegrityError's text shows the SQL but never the password hash it was bound with."""
    secret_hash = "$argon2id$v=19$m=65536,t=3,p=4$c2VjcmV0c2FsdA$" + new_id()
    engine = make_engine(migrated)
    try:
        maker = make_sessionmaker(engine)
        async with maker() as db, db.begin():
            db.add(Technician(id=new_id(), username="dup", password_hash="x", role=Role.TECH))
        with pytest.raises(IntegrityError) as caught:
            async with maker() as db, db.begin():
                db.add(
                    Technician(
                        id=new_id(), username="dup", password_hash=secret_hash, role=Role.TECH
                    )
                )
    finally:
        await engine.dispose()
    assert secret_hash not in str(caught.value)
    assert "hide_parameters" in str(caught.value)


async def test_serve_writes_json_log_lines_without_secrets(
    tmp_path: Path, nats_url: str, subject_prefix: str, nc: NatsClient
) -> None:
    """A real serve process: after a failed login, a bad token and an enrolment, every log line
    is JSON, the enrolment line names the agent, and no password, token or credential appears."""
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
        "GT_ADMIN_PASSWORD": PASSWORD,
    }
    code, out = await run_cli("keygen", "--private", str(private), "--public", str(public), env=env)
    assert code == 0, out
    code, out = await run_cli("migrate", env=env)
    assert code == 0, out
    code, out = await run_cli("create-admin", "--username", "root", env=env)
    assert code == 0, out

    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            CLI, "serve", "--no-migrate", env=env, stdout=log_file, stderr=log_file
        )
        try:
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:

                async def up() -> bool:
                    try:
                        return (await client.get("/healthz")).status_code == 200
                    except httpx.TransportError:
                        return False

                await wait_until(up, timeout_s=20, what="serve to answer")
                wrong = "wrong-" + PASSWORD
                bad = await client.post(
                    "/api/v1/auth/token", json={"username": "root", "password": wrong}
                )
                assert bad.status_code == 401
                forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
                refused = await client.get(
                    "/api/v1/agents", headers={"Authorization": f"Bearer {forged}"}
                )
                assert refused.status_code == 401
                good = await client.post(
                    "/api/v1/auth/token", json={"username": "root", "password": PASSWORD}
                )
                assert good.status_code == 200, good.text
                token = good.json()["access_token"]
                enrolled = await client.post(
                    "/api/v1/agents",
                    json={"name": "pc-logs"},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert enrolled.status_code == 201, enrolled.text
                agent_id = enrolled.json()["agent"]["id"]
                credential = enrolled.json()["credential"]
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)

    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, "serve wrote no log line"
    for secret in (PASSWORD, wrong, forged, token, credential, JWT_SECRET):
        assert secret not in text
    assert any(
        line.get("message") == "agent enrolled" and line.get("agent_id") == agent_id
        for line in lines
    ), lines
    assert any(line.get("logger", "").startswith("uvicorn") for line in lines), lines
