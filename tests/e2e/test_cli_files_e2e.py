"""``gurutunnel put`` / ``get`` end to end: a real CLI process against the real stack.

API (uvicorn), gateway and agent are real processes on real NATS (SQLite and PostgreSQL); the
agent only allows files under a directory of this test (``GT_AGENT_FILE_ALLOWLIST``). The CLI
runs as a subprocess configured through GT_CLI_API_URL / GT_CLI_TOKEN.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devstack.processes import ManagedProcess, executable
from devstack.stack import Stack

pytestmark = pytest.mark.slow

CLI_TIMEOUT_S = 120
FILE_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def admin(stack: Stack) -> tuple[str, str]:
    """(username, password) of an admin (who may upload and download) made by the API's CLI."""
    username = f"admin{secrets.token_hex(3)}"
    return username, stack.create_admin(username)


@pytest.fixture
def token(stack: Stack, admin: tuple[str, str]) -> str:
    return stack.token(*admin)


def _wait_online(client: httpx.Client, agent_id: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.get(f"/agents/{agent_id}")
        if r.status_code == 200 and r.json()["online"] is True:
            return
        time.sleep(0.05)
    raise AssertionError(f"agent {agent_id} not online within {timeout_s}s")


@dataclass(frozen=True)
class FileSession:
    session_id: str
    allowed: Path
    """The only directory the agent lets a transfer touch."""


@pytest.fixture
def file_session(stack: Stack, token: str, tmp_path: Path) -> Iterator[FileSession]:
    """A real agent allowed only ``<tmp>/allowed``, online, with an active session."""
    allowed = (tmp_path / "allowed").resolve()
    allowed.mkdir()
    agent = stack.enroll(token, f"agent-{secrets.token_hex(3)}")
    proc: ManagedProcess = stack.start_agent(
        agent,
        GT_AGENT_FILE_ALLOWLIST=json.dumps([str(allowed)]),
        GT_AGENT_CWD_ALLOWLIST=json.dumps([str(allowed)]),
    )
    try:
        with stack.client(token) as client:
            _wait_online(client, agent.id)
            r = client.post("/tunnel/open", json={"agent_id": agent.id})
        assert r.status_code == 201, r.text
        yield FileSession(session_id=r.json()["id"], allowed=allowed)
    finally:
        proc.stop()


def _env(stack: Stack, token: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GT_CLI_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["GT_CLI_API_URL"] = stack.api_url
    env["GT_CLI_TOKEN"] = token
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [executable("gurutunnel"), *args],
        env=env,
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def test_put_then_get_a_5_mb_file_gives_back_the_same_sha256(
    stack: Stack, token: str, file_session: FileSession, tmp_path: Path
) -> None:
    """put 5 MB, get it back: same SHA-256 on every side; a second put needs --overwrite."""
    env = _env(stack, token, tmp_path)
    data = os.urandom(FILE_BYTES)
    sha = hashlib.sha256(data).hexdigest()
    local = tmp_path / "up.bin"
    local.write_bytes(data)
    remote = str(file_session.allowed / "remote.bin")

    put = _cli(env, "put", file_session.session_id, str(local), remote)
    assert put.returncode == 0, put.stderr.decode()
    assert put.stdout.decode() == f"{remote} {FILE_BYTES} {sha}\n"
    # the agent runs on this machine: its file is the one we sent
    assert hashlib.sha256(Path(remote).read_bytes()).hexdigest() == sha

    back = tmp_path / "back.bin"
    got = _cli(env, "get", file_session.session_id, remote, str(back))
    assert got.returncode == 0, got.stderr.decode()
    assert got.stdout.decode() == f"{back} {FILE_BYTES} {sha}\n"
    assert hashlib.sha256(back.read_bytes()).hexdigest() == sha
    assert not (tmp_path / "back.bin.gtpart").exists()

    again = _cli(env, "put", file_session.session_id, str(local), remote)
    # the progress of hashing the local file comes first on stderr, then the API's refusal
    assert again.returncode == 1
    assert b"\ngurutunnel: file_exists: " in again.stderr
    replaced = _cli(env, "put", file_session.session_id, str(local), remote, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr.decode()


def test_get_outside_the_allowlist_fails_with_path_not_allowed(
    stack: Stack, token: str, file_session: FileSession, tmp_path: Path
) -> None:
    """A readable file outside the agent's allowlist (and a relative path): path_not_allowed."""
    env = _env(stack, token, tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    target = tmp_path / "stolen.txt"

    refused = _cli(env, "get", file_session.session_id, str(outside), str(target))
    assert refused.returncode == 1, refused.stderr.decode()
    assert refused.stderr.startswith(b"gurutunnel: path_not_allowed: ")
    assert b"Traceback" not in refused.stderr
    assert not target.exists() and not (tmp_path / "stolen.txt.gtpart").exists()

    relative = _cli(env, "get", file_session.session_id, "allowed/../outside.txt", str(target))
    assert relative.returncode == 1
    assert relative.stderr.startswith(b"gurutunnel: path_not_allowed: ")
