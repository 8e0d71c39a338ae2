"""The ``gurutunnel`` console script end to end: a real CLI process against the real stack.

API (uvicorn), gateway and agent are real processes on real NATS, on SQLite and PostgreSQL; the
CLI runs as a subprocess configured only through GT_CLI_API_URL / GT_CLI_TOKEN (or the file
``login`` writes), the way a technician's script would use it.
"""

from __future__ import annotations

import json
import os
import pty
import secrets
import select
import stat
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.processes import ManagedProcess, executable
from devstack.stack import EnrolledAgent, Stack

pytestmark = pytest.mark.slow

CLI_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def admin(stack: Stack) -> tuple[str, str]:
    """(username, password) of an admin created through the API's command line."""
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


@pytest.fixture
def live_agent(stack: Stack, token: str) -> Iterator[EnrolledAgent]:
    """A real gurutunnel-agent process, enrolled and online."""
    agent = stack.enroll(token, f"agent-{secrets.token_hex(3)}")
    proc: ManagedProcess = stack.start_agent(agent)
    try:
        with stack.client(token) as client:
            _wait_online(client, agent.id)
        yield agent
    finally:
        proc.stop()


@pytest.fixture
def session_id(stack: Stack, token: str, live_agent: EnrolledAgent) -> str:
    """An active session on the live agent, opened through the REST API."""
    with stack.client(token) as client:
        r = client.post("/tunnel/open", json={"agent_id": live_agent.id})
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


def _env(stack: Stack, token: str | None, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GT_CLI_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["GT_CLI_API_URL"] = stack.api_url
    if token:
        env["GT_CLI_TOKEN"] = token
    return env


def _cli(
    env: dict[str, str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [executable("gurutunnel"), *args],
        env=env,
        input=stdin,
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def _json(result: subprocess.CompletedProcess[bytes]) -> Any:
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_login_writes_a_0600_credentials_file_that_later_commands_use(
    stack: Stack, admin: tuple[str, str], tmp_path: Path
) -> None:
    """login --password-stdin stores the token 0600 in a 0700 dir; agents then works with it."""
    env = _env(stack, None, tmp_path)
    del env["GT_CLI_API_URL"]
    username, password = admin
    result = _cli(
        env,
        "login",
        "--api",
        stack.api_url,
        "--username",
        username,
        "--password-stdin",
        stdin=f"{password}\n".encode(),
    )
    assert result.returncode == 0, result.stderr.decode()
    path = tmp_path / "config" / "gurutunnel" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stored = json.loads(path.read_text())
    assert stored["api_url"] == stack.api_url and stored["token"] and stored["expires_at"]
    assert password not in path.read_text()

    assert "data" in _json(_cli(env, "agents", "--json"))

    wrong = _cli(env, "login", "--api", stack.api_url, "-u", username, "--password-stdin",
                 stdin=b"wrong-password\n")  # fmt: skip
    assert wrong.returncode == 3 and b"gurutunnel: unauthorized:" in wrong.stderr


def test_rejected_token_exits_3_with_the_login_hint(stack: Stack, tmp_path: Path) -> None:
    """A token the API refuses exits 3 and says to run gurutunnel login (no traceback)."""
    result = _cli(_env(stack, "not-a-jwt", tmp_path), "sessions")
    assert result.returncode == 3
    assert b"run gurutunnel login" in result.stderr and b"Traceback" not in result.stderr


def test_agents_open_sessions_status_close(
    stack: Stack, token: str, live_agent: EnrolledAgent, tmp_path: Path
) -> None:
    """agents lists the agent, open prints only the id, sessions/status show it, close ends it."""
    env = _env(stack, token, tmp_path)
    agents = _json(_cli(env, "agents", "--json"))
    mine = [a for a in agents["data"] if a["id"] == live_agent.id]
    assert len(mine) == 1 and mine[0]["online"] is True
    table = _cli(env, "agents")
    assert table.returncode == 0 and live_agent.id.encode() in table.stdout

    opened = _cli(env, "open", live_agent.id)
    assert opened.returncode == 0, opened.stderr.decode()
    sid = opened.stdout.decode().strip()
    assert opened.stdout == f"{sid}\n".encode() and len(sid) >= 8
    assert b"active" in opened.stderr

    listed = _json(_cli(env, "sessions", "--agent", live_agent.id, "--json"))
    assert [(s["id"], s["state"]) for s in listed["data"]] == [(sid, "active")]
    assert sid.encode() in _cli(env, "sessions", "--agent", live_agent.id).stdout
    assert _json(_cli(env, "status", sid, "--json"))["state"] == "active"

    closed = _cli(env, "close", sid)
    assert closed.returncode == 0, closed.stderr.decode()
    assert _json(_cli(env, "status", sid, "--json"))["state"] == "closed"
    again = _cli(env, "open", "no-such-agent")
    assert again.returncode == 1 and again.stderr.startswith(b"gurutunnel: not_found: ")


def test_exec_streams_to_the_right_fds_and_exits_with_the_command_code(
    stack: Stack, token: str, session_id: str, tmp_path: Path
) -> None:
    """exec -- sh -c '...; exit 3': out on stdout, err on stderr, exit 3; --sh nosuchcmd: 127."""
    env = _env(stack, token, tmp_path)
    result = _cli(env, "exec", session_id, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3, result.stderr.decode()
    assert result.stdout == b"out\n"
    assert b"err\n" in result.stderr and b"out" not in result.stderr

    missing = _cli(env, "exec", session_id, "--sh", "nosuchcmd")
    assert missing.returncode == 127, missing.stderr.decode()

    ok = _cli(env, "exec", session_id, "--", "printf", "a\\000b")
    assert ok.returncode == 0 and ok.stdout == b"a\x00b"


def _read_until(
    fd: int, needle: bytes, proc: subprocess.Popen[bytes], timeout_s: float, min_bytes: int = 0
) -> bytes:
    """Bytes from ``fd`` until ``needle`` (and at least ``min_bytes``) arrived, bounded."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    while needle not in seen or len(seen) < min_bytes:
        if proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
            raise AssertionError(f"the CLI exited {proc.returncode} before {needle!r}: {seen!r}")
        left = min(deadline - time.monotonic(), 0.5)
        if time.monotonic() >= deadline:
            raise AssertionError(f"{needle!r} not seen within {timeout_s}s; got {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    if needle not in seen or len(seen) < min_bytes:
        raise AssertionError(f"the terminal closed before {needle!r}; got {seen[-500:]!r}")
    return seen


def test_shell_under_a_real_pty_runs_commands_and_exits_with_the_shell(
    stack: Stack, token: str, session_id: str, tmp_path: Path
) -> None:
    """gurutunnel shell in a pty: 'echo hi-$((1+1))' prints hi-2, 'exit' ends it with 0."""
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [executable("gurutunnel"), "shell", session_id],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=_env(stack, token, tmp_path),
        start_new_session=True,
    )
    try:
        # type only once the remote shell has printed (its prompt): the CLI switches the tty to
        # raw mode before that, and doing so flushes input typed earlier
        _read_until(master, b"", proc, timeout_s=20, min_bytes=1)
        os.write(master, b"echo hi-$((1+1))\r")
        _read_until(master, b"hi-2", proc, timeout_s=20)
        os.write(master, b"exit\r")
        assert proc.wait(timeout=20) == 0
        assert termios.tcgetattr(slave) == before, "the CLI left the terminal in raw mode"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
        os.close(slave)
