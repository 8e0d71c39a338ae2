"""File transfer end to end: upload, resume, download through the real API, gateway and agent
processes on real NATS (SQLite and PostgreSQL); the agent may only touch a directory of the
test (``GT_AGENT_FILE_ALLOWLIST``), and its files are checked on this machine's disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devstack.processes import ManagedProcess
from devstack.stack import EnrolledAgent, Stack
from tests.e2e.conftest import api_client

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
BIG_BYTES = 50 * MIB


@pytest.fixture(scope="module")
def admin(stack: Stack) -> tuple[str, str]:
    username = f"admin{secrets.token_hex(3)}"
    return username, stack.create_admin(username)


@pytest.fixture
async def client(stack: Stack, admin: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(stack, stack.token(*admin)) as c:
        yield c


@dataclass(frozen=True)
class Files:
    session_id: str
    allowed: Path
    """The only directory the agent lets a transfer touch."""
    outside: Path
    """A directory next to it that the agent must never reach."""

    @property
    def url(self) -> str:
        return f"/tunnel/{self.session_id}/files"


async def _wait_online(client: httpx.AsyncClient, agent_id: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = await client.get(f"/agents/{agent_id}")
        if r.status_code == 200 and r.json()["online"] is True:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"agent {agent_id} not online within {timeout_s}s")


@pytest.fixture
async def files(stack: Stack, client: httpx.AsyncClient, tmp_path: Path) -> AsyncIterator[Files]:
    """An active session on a real agent allowed only ``<tmp>/allowed``."""
    allowed = (tmp_path / "allowed").resolve()
    outside = (tmp_path / "outside").resolve()
    allowed.mkdir()
    outside.mkdir()
    r = await client.post("/agents", json={"name": f"agent-{secrets.token_hex(3)}"})
    assert r.status_code == 201, r.text
    body = r.json()
    agent = EnrolledAgent(
        id=body["agent"]["id"], name=body["agent"]["name"], credential=body["credential"]
    )
    proc: ManagedProcess = stack.start_agent(
        agent,
        GT_AGENT_FILE_ALLOWLIST=json.dumps([str(allowed)]),
        GT_AGENT_CWD_ALLOWLIST=json.dumps([str(allowed)]),
    )
    try:
        await _wait_online(client, agent.id)
        r = await client.post("/tunnel/open", json={"agent_id": agent.id})
        assert r.status_code == 201, r.text
        yield Files(session_id=str(r.json()["id"]), allowed=allowed, outside=outside)
    finally:
        proc.stop()


async def _pieces(data: bytes, piece_bytes: int = MIB) -> AsyncIterator[bytes]:
    for at in range(0, len(data), piece_bytes):
        yield data[at : at + piece_bytes]


async def _put(
    client: httpx.AsyncClient,
    files: Files,
    path: str,
    data: bytes,
    *,
    sha256: str | None = None,
    content_range: str | None = None,
) -> httpx.Response:
    headers = {
        "Content-Length": str(len(data)),
        "X-Content-SHA256": sha256 or hashlib.sha256(data).hexdigest(),
    }
    if content_range is not None:
        headers["Content-Range"] = content_range
    # an async iterable body with an explicit length: streamed, never chunked
    return await client.put(
        files.url, params={"path": path}, content=_pieces(data), headers=headers
    )


async def _get(
    client: httpx.AsyncClient, files: Files, path: str
) -> tuple[httpx.Response, hashlib._Hash, int]:
    hasher, received = hashlib.sha256(), 0
    async with client.stream("GET", files.url, params={"path": path}) as r:
        if r.status_code == 200:
            async for piece in r.aiter_bytes():
                hasher.update(piece)
                received += len(piece)
        else:
            await r.aread()
    return r, hasher, received


async def test_50_mb_upload_and_download_keep_the_sha256(
    client: httpx.AsyncClient, files: Files
) -> None:
    """50 MB up and back down: the agent's file and the downloaded bytes hash the same."""
    data = os.urandom(BIG_BYTES)
    sha = hashlib.sha256(data).hexdigest()
    target = files.allowed / "big.bin"

    r = await _put(client, files, str(target), data)
    assert r.status_code == 201, r.text
    assert r.json() == {"path": str(target), "size": BIG_BYTES, "sha256": sha}
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha

    r, hasher, received = await _get(client, files, str(target))
    assert r.status_code == 200, r.text
    assert r.headers["X-Content-SHA256"] == sha
    assert int(r.headers["Content-Length"]) == received == BIG_BYTES
    assert hasher.hexdigest() == sha


class _ClientQuits(Exception):
    """Raised by a request body to make httpx drop the connection mid-upload."""


async def test_interrupted_upload_resumes_from_the_agents_offset(
    client: httpx.AsyncClient, files: Files
) -> None:
    """A client that sends half the body and closes leaves a partial on the agent;
    upload-offset reports it and a Content-Range PUT of the rest completes a verified file."""
    data = os.urandom(16 * MIB)
    sha = hashlib.sha256(data).hexdigest()
    target = files.allowed / "resumed.bin"
    half = len(data) // 2

    async def half_then_quit() -> AsyncIterator[bytes]:
        async for piece in _pieces(data[:half]):
            yield piece
        raise _ClientQuits

    with pytest.raises(_ClientQuits):
        await client.put(
            files.url,
            params={"path": str(target)},
            content=half_then_quit(),
            headers={"Content-Length": str(len(data)), "X-Content-SHA256": sha},
        )
    assert not target.exists()

    offset = 0
    deadline = time.monotonic() + 15
    while offset == 0 and time.monotonic() < deadline:
        r = await client.post(
            f"{files.url}/upload-offset",
            json={"path": str(target), "size": len(data), "sha256": sha},
        )
        assert r.status_code == 200, r.text
        offset = r.json()["offset"]
        if offset == 0:
            await asyncio.sleep(0.1)
    assert 0 < offset <= half

    r = await _put(
        client,
        files,
        str(target),
        data[offset:],
        sha256=sha,
        content_range=f"bytes {offset}-{len(data) - 1}/{len(data)}",
    )
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == sha
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha
    assert not [p for p in files.allowed.iterdir() if ".gtpart-" in p.name]


async def test_traversal_and_symlinks_out_of_the_allowlist_are_refused(
    client: httpx.AsyncClient, files: Files
) -> None:
    """'..' is 422 before anything is sent; a path outside the allowlist, a symlinked directory
    and a symlinked file leading out are 403 path_not_allowed; nothing is read or written."""
    secret = files.outside / "secret.txt"
    secret.write_text("secret")
    (files.allowed / "dir-link").symlink_to(files.outside, target_is_directory=True)
    (files.allowed / "file-link.txt").symlink_to(secret)

    dotdot = f"{files.allowed}/../outside/secret.txt"
    r, _, _ = await _get(client, files, dotdot)
    assert r.status_code == 422 and r.json()["error"]["code"] == "path_not_allowed"
    r = await _put(client, files, dotdot, b"pwned")
    assert r.status_code == 422 and r.json()["error"]["code"] == "path_not_allowed"

    for path in (
        str(secret),
        f"{files.allowed}/dir-link/secret.txt",
        f"{files.allowed}/file-link.txt",
    ):
        r, _, received = await _get(client, files, path)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["code"] == "path_not_allowed"
        assert received == 0
    for path in (str(files.outside / "new.txt"), f"{files.allowed}/dir-link/new.txt"):
        r = await _put(client, files, path, b"pwned")
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["code"] == "path_not_allowed"
    r = await _put(client, files, f"{files.allowed}/file-link.txt", b"pwned")
    assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed"
    assert sorted(p.name for p in files.outside.iterdir()) == ["secret.txt"]
    assert secret.read_text() == "secret"


async def test_download_of_a_file_changed_midway_ends_short_of_content_length(
    client: httpx.AsyncClient, files: Files
) -> None:
    """The file changes while it is sent: the agent's file.failed cuts the response, and the
    client gets fewer bytes than Content-Length, never a complete-looking body."""
    target = files.allowed / "changing.bin"
    size = 24 * MIB
    target.write_bytes(os.urandom(size))
    received = 0
    failure: Exception | None = None
    async with client.stream("GET", files.url, params={"path": str(target)}) as r:
        assert r.status_code == 200
        assert int(r.headers["Content-Length"]) == size
        try:
            async for piece in r.aiter_bytes():
                if received == 0:
                    # far beyond the agent's window: these bytes have not been read yet
                    with target.open("r+b") as f:
                        f.seek(size - MIB)
                        f.write(os.urandom(1024))
                received += len(piece)
        except httpx.RemoteProtocolError as exc:
            failure = exc
    assert isinstance(failure, httpx.RemoteProtocolError), "the body must be cut, not completed"
    assert 0 < received < size
