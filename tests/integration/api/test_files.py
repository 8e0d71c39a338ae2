"""File transfer through the real API (uvicorn on real sockets), real NATS and both databases,
with a fake gateway on the bus playing the agent's file channels: upload in chunks within the
window, resume, download with Range, a download cut short, permissions, traversal, audit."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from nats.aio.client import Client as NatsClient

from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine
from gurutunnel_protocol import ErrorCode, Subjects
from gurutunnel_protocol.messages import FileDownload, FileUpload

from .conftest import FakeGateway, LiveApi, User, Users, serving_api, wait_until

REMOTE = "/srv/data/report.bin"


@dataclass
class World:
    live: LiveApi
    gw: FakeGateway
    users: Users
    session_id: str

    @property
    def url(self) -> str:
        return f"/api/v1/tunnel/{self.session_id}/files"

    async def put(
        self,
        data: bytes,
        *,
        path: str = REMOTE,
        sha256: str | None = None,
        user: User | None = None,
        headers: dict[str, str] | None = None,
        overwrite: bool = False,
    ) -> httpx.Response:
        return await self.live.client.put(
            self.url,
            params={"path": path, "overwrite": str(overwrite).lower()},
            content=data,
            headers={
                **(user or self.users.tech).headers,
                "X-Content-SHA256": sha256 or hashlib.sha256(data).hexdigest(),
                **(headers or {}),
            },
        )

    async def get(
        self, path: str = REMOTE, *, user: User | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.live.client.get(
            self.url,
            params={"path": path},
            headers={**(user or self.users.tech).headers, **(headers or {})},
        )

    async def audit(self, action: str) -> list[dict[str, Any]]:
        r = await self.live.client.get(
            "/api/v1/audit",
            params={"session_id": self.session_id, "action": action},
            headers=self.users.admin.headers,
        )
        assert r.status_code == 200, r.text
        rows: list[dict[str, Any]] = r.json()["data"]
        return rows

    async def ended_audit(self, action: str, count: int = 1) -> list[dict[str, Any]]:
        """The rows of ``action`` once ``count`` of them are completed."""

        async def completed() -> bool:
            rows = await self.audit(action)
            return len([r for r in rows if r["ended_at"] is not None]) >= count

        await wait_until(completed, what=f"{action} audit rows completed")
        return await self.audit(action)

    async def allow_upload(self, user: User) -> None:
        r = await self.live.client.patch(
            f"/api/v1/users/{user.id}", json={"can_upload": True}, headers=self.users.admin.headers
        )
        assert r.status_code == 200, r.text
        assert r.json()["can_upload"] is True


@pytest.fixture
async def world(
    migrated: ApiSettings, nc: NatsClient, subject_prefix: str, users: Users
) -> AsyncIterator[World]:
    settings = migrated.model_copy(update={"file_idle_timeout_s": 2.0, "file_cancel_wait_s": 2.0})
    async with serving_api(settings) as live:
        r = await live.client.post(
            "/api/v1/agents", json={"name": "pc-01"}, headers=users.admin.headers
        )
        assert r.status_code == 201, r.text
        gw = await FakeGateway(
            nc=nc, subjects=Subjects(subject_prefix), agent_id=r.json()["agent"]["id"]
        ).start()
        try:
            r = await live.client.post(
                "/api/v1/tunnel/open", json={"agent_id": gw.agent_id}, headers=users.tech.headers
            )
            assert r.status_code == 201, r.text
            await gw.watch_down(r.json()["id"])
            yield World(live=live, gw=gw, users=users, session_id=r.json()["id"])
        finally:
            await gw.stop()


# ---------------------------------------------------------------- upload
async def test_upload_is_streamed_in_agent_chunks_within_the_window(world: World) -> None:
    """A 300 KB PUT reaches the agent as chunk_bytes chunks, never more than the window
    unacknowledged, and answers 201 with the agent's path, size and SHA-256."""
    await world.allow_upload(world.users.tech)
    data = os.urandom(300 * 1024 + 5)
    r = await world.put(data)
    assert r.status_code == 201, r.text
    sha = hashlib.sha256(data).hexdigest()
    assert r.json() == {"path": REMOTE, "size": len(data), "sha256": sha}
    files = world.gw.files
    assert files.store[REMOTE] == data
    assert all(len(c.data) <= files.chunk_bytes for c in files.chunks)
    assert len(files.chunks) == -(-len(data) // files.chunk_bytes)
    assert 0 < files.max_unacked <= files.window_bytes


async def test_upload_resumes_from_the_offset_the_agent_holds(world: World) -> None:
    """upload-offset reports the partial the agent holds; a PUT with Content-Range from there,
    or of the whole file (the held bytes dropped by the API), completes it; another start is
    409 conflict with X-Upload-Offset."""
    await world.allow_upload(world.users.tech)
    data = os.urandom(200 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    held = 70 * 1024
    files = world.gw.files
    files.partials[(REMOTE, sha)] = data[:held]

    r = await world.live.client.post(
        f"{world.url}/upload-offset",
        json={"path": REMOTE, "size": len(data), "sha256": sha},
        headers=world.users.tech.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"offset": held}
    assert len(files.cancels) == 1  # the probe's transfer was cancelled on the agent

    wrong = await world.put(
        data[1000:],
        sha256=sha,
        headers={"Content-Range": f"bytes 1000-{len(data) - 1}/{len(data)}"},
    )
    assert wrong.status_code == 409, wrong.text
    assert wrong.json()["error"]["code"] == "conflict"
    assert wrong.headers["X-Upload-Offset"] == str(held)

    r = await world.put(
        data[held:],
        sha256=sha,
        headers={"Content-Range": f"bytes {held}-{len(data) - 1}/{len(data)}"},
    )
    assert r.status_code == 201, r.text
    assert files.store[REMOTE] == data
    assert files.chunks[0].offset == held

    files.chunks.clear()
    files.partials[("/srv/data/second.bin", sha)] = data[:held]
    r = await world.put(data, path="/srv/data/second.bin")
    assert r.status_code == 201, r.text
    assert files.store["/srv/data/second.bin"] == data
    assert files.chunks[0].offset == held
    assert sum(len(c.data) for c in files.chunks) == len(data) - held


@pytest.mark.parametrize(
    ("path", "code", "status"),
    [
        ("/etc/shadow", ErrorCode.PATH_NOT_ALLOWED, 403),
        ("/srv/none/x.bin", ErrorCode.FILE_NOT_FOUND, 404),
        ("/srv/big.bin", ErrorCode.FILE_TOO_LARGE, 413),
        ("/srv/broken.bin", ErrorCode.IO_ERROR, 502),
    ],
)
async def test_agent_refusals_of_an_upload_map_to_their_status(
    world: World, path: str, code: ErrorCode, status: int
) -> None:
    """The agent's tunnel.error codes come back with the contract's statuses, audited."""
    await world.allow_upload(world.users.tech)
    world.gw.files.refuse[path] = code
    r = await world.put(b"x" * 100, path=path)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code.value
    [row] = await world.ended_audit("file.upload")
    assert row["reason"] == code.value


async def test_existing_target_is_409_and_wrong_hash_is_422_with_nothing_stored(
    world: World,
) -> None:
    """Without overwrite an existing target is 409 file_exists; a body that does not hash to
    X-Content-SHA256 is 422 hash_mismatch and nothing is stored under the name."""
    await world.allow_upload(world.users.tech)
    world.gw.files.store[REMOTE] = b"old"
    r = await world.put(b"new")
    assert r.status_code == 409 and r.json()["error"]["code"] == "file_exists"
    r = await world.put(b"new", overwrite=True)
    assert r.status_code == 201, r.text
    r = await world.put(b"abc", path="/srv/data/other.bin", sha256="0" * 64)
    assert r.status_code == 422 and r.json()["error"]["code"] == "hash_mismatch"
    assert "/srv/data/other.bin" not in world.gw.files.store


async def test_bad_upload_headers_are_refused_before_anything_is_sent(world: World) -> None:
    """No Content-Length: 411; a bad X-Content-SHA256 or Content-Range: 422 validation_error."""
    await world.allow_upload(world.users.tech)

    async def chunked() -> AsyncIterator[bytes]:
        yield b"abc"

    r = await world.live.client.put(
        world.url,
        params={"path": REMOTE},
        content=chunked(),
        headers={**world.users.tech.headers, "X-Content-SHA256": "a" * 64},
    )
    assert r.status_code == 411 and r.json()["error"]["code"] == "validation_error"
    r = await world.put(b"abc", sha256="ABC")
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    r = await world.put(b"abc", headers={"Content-Range": "bytes 0-1/3"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    assert world.gw.files.requests == []


# ---------------------------------------------------------------- download
async def test_download_with_and_without_range_acks_each_chunk(world: World) -> None:
    """GET streams the file with Content-Length, X-Content-SHA256 and Content-Disposition;
    Range gives 206 with Content-Range; every chunk is acknowledged; Range beyond the size is
    416 with Content-Range: bytes */size."""
    data = os.urandom(150 * 1024 + 3)
    sha = hashlib.sha256(data).hexdigest()
    files = world.gw.files
    files.store[REMOTE] = data

    r = await world.get()
    assert r.status_code == 200, r.text
    assert r.content == data
    assert r.headers["Content-Length"] == str(len(data))
    assert r.headers["X-Content-SHA256"] == sha
    assert r.headers["Content-Disposition"] == 'attachment; filename="report.bin"'

    # each chunk but the last is acknowledged after it was handed to the client
    async def acked() -> bool:
        return len(files.acks) >= len(data) // files.chunk_bytes

    await wait_until(acked, what="acks")
    assert [a.offset for a in files.acks][:3] == [16384, 32768, 49152]

    start = 100_000
    r = await world.get(headers={"Range": f"bytes={start}-"})
    assert r.status_code == 206, r.text
    assert r.content == data[start:]
    assert r.headers["Content-Range"] == f"bytes {start}-{len(data) - 1}/{len(data)}"
    assert r.headers["X-Content-SHA256"] == sha
    assert [f.offset for f in files.requests if isinstance(f, FileDownload)][-1] == start

    for beyond in (len(data), len(data) + 10):
        r = await world.get(headers={"Range": f"bytes={beyond}-"})
        assert r.status_code == 416, r.text
        assert r.json()["error"]["code"] == "range_not_satisfiable"
        assert r.headers["Content-Range"] == f"bytes */{len(data)}"
        assert r.headers["X-Content-SHA256"] == sha

    rows = await world.ended_audit("file.download", count=4)
    assert [r["reason"] for r in rows] == ["done", "done", *["range_not_satisfiable"] * 2]
    assert rows[1]["file_offset"] == start and rows[1]["file_sha256"] == sha


async def test_download_failing_after_the_headers_is_cut_short(world: World) -> None:
    """file.failed after the headers: the connection is cut and the body is short of
    Content-Length (httpx sees an incomplete body); the audit row says hash_mismatch."""
    data = os.urandom(200 * 1024)
    files = world.gw.files
    files.store[REMOTE] = data
    files.change_after_bytes = 96 * 1024
    received = 0
    failure: Exception | None = None
    async with world.live.client.stream(
        "GET", world.url, params={"path": REMOTE}, headers=world.users.tech.headers
    ) as r:
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(len(data))
        try:
            async for piece in r.aiter_bytes():
                received += len(piece)
        except httpx.RemoteProtocolError as exc:
            failure = exc
    assert isinstance(failure, httpx.RemoteProtocolError)
    assert received < len(data)
    [row] = await world.ended_audit("file.download")
    assert row["reason"] == "hash_mismatch"


async def test_missing_file_is_404_and_an_empty_file_is_200(world: World) -> None:
    """A missing file is 404 file_not_found; an empty file is 200 with an empty body."""
    r = await world.get("/srv/data/none.bin")
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    world.gw.files.store["/srv/data/empty.bin"] = b""
    r = await world.get("/srv/data/empty.bin", headers={"Range": "bytes=0-"})
    assert r.status_code == 200 and r.content == b""


# ---------------------------------------------------------------- permissions, paths, audit
async def test_permissions_decide_who_may_upload_and_download(world: World) -> None:
    """A tech downloads but may not upload until an admin grants can_upload (403 forbidden);
    a viewer may do neither; POST /users applies the role defaults; PATCH is admin only."""
    world.gw.files.store[REMOTE] = b"data"
    denied = await world.put(b"data", path="/srv/data/new.bin")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
    assert (await world.get()).status_code == 200
    for request in (world.put(b"x", user=world.users.viewer), world.get(user=world.users.viewer)):
        r = await request
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"

    admin = world.users.admin.headers
    r = await world.live.client.patch(
        f"/api/v1/users/{world.users.tech.id}", json={"can_upload": True}, headers=admin
    )
    assert r.status_code == 200, r.text
    assert (r.json()["can_upload"], r.json()["can_download"]) == (True, True)
    assert (await world.put(b"data", path="/srv/data/new.bin")).status_code == 201
    r = await world.live.client.patch(
        f"/api/v1/users/{world.users.tech.id}", json={"can_download": False}, headers=admin
    )
    assert r.status_code == 200
    assert (await world.get()).status_code == 403

    made = {}
    for role, asked in (("tech", {}), ("admin", {"can_upload": False}), ("viewer", {})):
        r = await world.live.client.post(
            "/api/v1/users",
            json={"username": f"new-{role}", "password": "long enough pw", "role": role, **asked},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        made[role] = (r.json()["can_upload"], r.json()["can_download"])
    assert made == {"tech": (False, True), "admin": (True, True), "viewer": (False, False)}

    r = await world.live.client.patch(
        f"/api/v1/users/{world.users.tech2.id}",
        json={"can_upload": True},
        headers=world.users.tech.headers,
    )
    assert r.status_code == 403
    r = await world.live.client.patch(
        "/api/v1/users/nosuchuser", json={"disabled": True}, headers=admin
    )
    assert r.status_code == 404
    r = await world.live.client.patch(
        f"/api/v1/users/{world.users.tech2.id}", json={"password": "x"}, headers=admin
    )
    assert r.status_code == 422


@pytest.mark.parametrize(
    "path",
    ["relative/file.bin", "/srv/../etc/passwd", "/srv/./x.bin", "/srv/x\x00.bin", "/srv/..", ""],
)
async def test_traversal_is_refused_422_before_anything_is_sent(world: World, path: str) -> None:
    """Not absolute, NUL, '.' or '..' component: 422 path_not_allowed for upload, probe and
    download; the agent never sees a request."""
    await world.allow_upload(world.users.tech)
    responses = [
        await world.put(b"x", path=path),
        await world.get(path),
        await world.live.client.post(
            f"{world.url}/upload-offset",
            json={"path": path, "size": 1, "sha256": "a" * 64},
            headers=world.users.tech.headers,
        ),
    ]
    for r in responses:
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "path_not_allowed"
    assert world.gw.files.requests == []


async def test_each_transfer_writes_one_audit_row_completed_at_its_end(world: World) -> None:
    """One file.upload and one file.download row: technician, agent, session, path, size,
    sha256, resume offset and outcome done."""
    await world.allow_upload(world.users.tech)
    data = os.urandom(40 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    world.gw.files.partials[(REMOTE, sha)] = data[:1000]
    assert (await world.put(data)).status_code == 201
    assert (await world.get()).status_code == 200
    [up] = await world.ended_audit("file.upload")
    [down] = await world.ended_audit("file.download")
    for row in (up, down):
        assert row["actor"] == world.users.tech.id
        assert row["agent_id"] == world.gw.agent_id
        assert row["session_id"] == world.session_id
        assert row["file_path"] == REMOTE
        assert (row["file_size"], row["file_sha256"]) == (len(data), sha)
        assert row["reason"] == "done"
    assert up["file_offset"] == 1000 and down["file_offset"] == 0


async def test_failed_audit_insert_answers_503_and_sends_nothing(world: World) -> None:
    """With tunnel_audit unwritable, upload and download are 503 database_unavailable and no
    file request reaches the agent."""
    await world.allow_upload(world.users.tech)
    world.gw.files.store[REMOTE] = b"data"
    engine = make_engine(world.live.settings)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("ALTER TABLE tunnel_audit RENAME TO tunnel_audit_away"))
        for r in (await world.put(b"new", path="/srv/data/n.bin"), await world.get()):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "database_unavailable"
        assert not [f for f in world.gw.files.requests if isinstance(f, FileUpload | FileDownload)]
    finally:
        async with engine.begin() as conn:
            await conn.execute(sa.text("ALTER TABLE tunnel_audit_away RENAME TO tunnel_audit"))
        await engine.dispose()
