"""``gurutunnel put`` / ``get``: resumable, hash-verified transfer against a fake files API.

The transfer logic runs against ``httpx.MockTransport`` (a fake API that records what it got);
the console commands run in process against a real local HTTP server, so real sockets carry the
streamed bodies and an aborted download is a real short body.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from devstack.processes import executable
from gurutunnel_cli.client import ApiClient
from gurutunnel_cli.errors import ApiError, CliError
from gurutunnel_cli.files import CHUNK_BYTES, FileTransfer, TransferProgress, part_path
from gurutunnel_cli.main import app

REMOTE = "/srv/data/blob.bin"
MiB = 1024 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _payload(size: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(size))


class FakeFilesApi:
    """The files part of the technician API, as a MockTransport handler.

    Upload: answers ``upload-offset`` with ``offset``; a PUT gets 409 + ``X-Upload-Offset`` for
    each entry of ``conflicts`` (consumed in order), else stores the bytes and answers 201.
    Download: serves ``content`` (honouring ``Range``), announcing ``announced_sha`` when set and
    cutting the body to ``short_by`` fewer bytes than its Content-Length.
    """

    def __init__(self, content: bytes = b"") -> None:
        self.offset = 0
        self.conflicts: list[int] = []
        self.file_exists = False
        self.content = content
        self.announced_sha: str | None = None
        self.short_by = 0
        self.ignore_range = False
        self.requests: list[httpx.Request] = []
        self.put_chunks: list[list[int]] = []
        self.put_bodies: list[bytes] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if request.method == "POST" and path == "/api/v1/tunnel/s1/files/upload-offset":
            return httpx.Response(200, json={"offset": self.offset})
        if request.method == "PUT" and path == "/api/v1/tunnel/s1/files":
            return await self._put(request)
        if request.method == "GET" and path == "/api/v1/tunnel/s1/files":
            return self._get(request)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    async def _put(self, request: httpx.Request) -> httpx.Response:
        chunks: list[bytes] = []
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for chunk in request.stream:
            chunks.append(chunk)
        self.put_chunks.append([len(c) for c in chunks])
        body = b"".join(chunks)
        self.put_bodies.append(body)
        if self.file_exists:
            return httpx.Response(409, json={"error": {"code": "file_exists", "message": "exists"}})
        if self.conflicts:
            return httpx.Response(
                409,
                headers={"X-Upload-Offset": str(self.conflicts.pop(0))},
                json={"error": {"code": "conflict", "message": "offset moved"}},
            )
        size = (
            int(request.headers["Content-Range"].rsplit("/", 1)[1])
            if ("Content-Range" in request.headers)
            else len(body)
        )
        return httpx.Response(
            201,
            json={
                "path": request.url.params["path"],
                "size": size,
                "sha256": request.headers["X-Content-SHA256"],
            },
        )

    def _get(self, request: httpx.Request) -> httpx.Response:
        size = len(self.content)
        headers = {"X-Content-SHA256": self.announced_sha or _sha(self.content)}
        start = 0
        status = 200
        if "Range" in request.headers and not self.ignore_range:
            start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= size:
                return httpx.Response(
                    416,
                    headers={"Content-Range": f"bytes */{size}"},
                    json={"error": {"code": "range_not_satisfiable", "message": "beyond"}},
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        body = self.content[start:]
        headers["Content-Length"] = str(len(body))
        sent = body[: len(body) - self.short_by]

        async def stream() -> AsyncIterator[bytes]:
            for i in range(0, len(sent), 300_000):
                yield sent[i : i + 300_000]

        return httpx.Response(status, headers=headers, content=stream())

    def of(self, method: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method]


class StreamingTransport(httpx.AsyncBaseTransport):
    """Like ``httpx.MockTransport`` but hands the handler the request body unread.

    (MockTransport reads the whole body first, which would hide how it was streamed.)
    """

    def __init__(self, api: FakeFilesApi) -> None:
        self.api = api

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.api.handle(request)


class Run:
    """A FileTransfer wired to the fake API, with its progress console and notices captured."""

    def __init__(self, api: FakeFilesApi) -> None:
        self.api = api
        self.progress_out = io.StringIO()
        self.notices: list[str] = []
        self.transfer = FileTransfer(
            "s1", TransferProgress(Console(file=self.progress_out)), self.notices.append
        )

    def client(self) -> ApiClient:
        return ApiClient("http://api.test", "tok", transport=StreamingTransport(self.api))

    async def put(self, local: Path, *, overwrite: bool = False) -> Any:
        async with self.client() as c:
            return await self.transfer.put(c, local, REMOTE, overwrite=overwrite)

    async def get(self, local: Path, *, overwrite: bool = False) -> Any:
        async with self.client() as c:
            return await self.transfer.get(c, REMOTE, local, overwrite=overwrite)


# ------------------------------------------------------------------------------ upload
async def test_upload_sends_only_the_remainder_with_content_range_and_sha_header(
    tmp_path: Path,
) -> None:
    """Offset 1 MiB+5: the PUT carries bytes from there, Content-Range/-Length and the full sha."""
    data = _payload(3 * MiB + 100)
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    api = FakeFilesApi()
    api.offset = MiB + 5
    result = await Run(api).put(local)

    (probe,) = api.of("POST")
    assert json.loads(probe.content) == {"path": REMOTE, "size": len(data), "sha256": _sha(data)}
    (put,) = api.of("PUT")
    assert put.url.params["path"] == REMOTE and put.url.params["overwrite"] == "false"
    assert put.headers["Content-Range"] == f"bytes {MiB + 5}-{len(data) - 1}/{len(data)}"
    assert put.headers["Content-Length"] == str(len(data) - MiB - 5)
    assert "Transfer-Encoding" not in put.headers
    assert put.headers["X-Content-SHA256"] == _sha(data)
    assert api.put_bodies == [data[MiB + 5 :]]
    # streamed in bounded reads, never one whole-file body
    assert len(api.put_chunks[0]) >= 3 and max(api.put_chunks[0]) <= CHUNK_BYTES
    assert result.line() == f"{REMOTE} {len(data)} {_sha(data)}"
    assert result.resumed_from == MiB + 5


@pytest.mark.parametrize("held", ["none", "all"])
async def test_upload_without_a_usable_offset_sends_the_whole_file_without_content_range(
    tmp_path: Path, held: str
) -> None:
    """Offset 0 (or every byte already held) sends the whole file; --overwrite is passed on."""
    data = _payload(5000)
    local = tmp_path / "f"
    local.write_bytes(data)
    api = FakeFilesApi()
    api.offset = 0 if held == "none" else len(data)
    await Run(api).put(local, overwrite=True)
    (put,) = api.of("PUT")
    assert "Content-Range" not in put.headers
    assert put.url.params["overwrite"] == "true"
    assert api.put_bodies == [data]


async def test_409_with_upload_offset_is_retried_once_from_that_offset(tmp_path: Path) -> None:
    """A 409 naming the agent's offset is retried once, sending only the bytes from there."""
    data = _payload(10_000)
    local = tmp_path / "f"
    local.write_bytes(data)
    api = FakeFilesApi()
    api.offset = 1000
    api.conflicts = [4000]
    run = Run(api)
    result = await run.put(local)
    first, second = api.of("PUT")
    assert first.headers["Content-Range"] == "bytes 1000-9999/10000"
    assert second.headers["Content-Range"] == "bytes 4000-9999/10000"
    assert api.put_bodies[1] == data[4000:]
    assert result.resumed_from == 4000
    assert any("4000" in n for n in run.notices)


async def test_second_409_is_reported_not_retried_again(tmp_path: Path) -> None:
    """Two offset conflicts in a row end with the API's conflict error after exactly two PUTs."""
    local = tmp_path / "f"
    local.write_bytes(_payload(10_000))
    api = FakeFilesApi()
    api.conflicts = [10, 20]
    with pytest.raises(ApiError) as info:
        await Run(api).put(local)
    assert info.value.code == "conflict" and info.value.exit_code == 1
    assert len(api.of("PUT")) == 2


async def test_409_file_exists_is_not_retried(tmp_path: Path) -> None:
    """409 file_exists (no X-Upload-Offset) is the answer: one PUT, error file_exists."""
    local = tmp_path / "f"
    local.write_bytes(b"x")
    api = FakeFilesApi()
    api.file_exists = True
    with pytest.raises(ApiError) as info:
        await Run(api).put(local)
    assert info.value.render() == "gurutunnel: file_exists: exists"
    assert len(api.of("PUT")) == 1


async def test_missing_local_file_fails_before_any_request(tmp_path: Path) -> None:
    """put of a missing file is a local error (exit 1) and the API is never called."""
    api = FakeFilesApi()
    with pytest.raises(CliError) as info:
        await Run(api).put(tmp_path / "nope")
    assert info.value.code == "local_io_error" and api.requests == []


# ------------------------------------------------------------------------------ download
async def test_download_resumes_with_range_and_hashes_the_whole_file(tmp_path: Path) -> None:
    """An existing .gtpart of N bytes: Range bytes=N-, the result equals the remote file."""
    data = _payload(2 * MiB + 77)
    local = tmp_path / "out.bin"
    part_path(local).write_bytes(data[:700_001])
    api = FakeFilesApi(data)
    result = await Run(api).get(local)
    (req,) = api.of("GET")
    assert req.headers["Range"] == "bytes=700001-"
    assert req.url.params["path"] == REMOTE
    assert local.read_bytes() == data
    assert not part_path(local).exists()
    assert result.line() == f"{local} {len(data)} {_sha(data)}"
    assert result.resumed_from == 700_001


async def test_download_without_part_sends_no_range(tmp_path: Path) -> None:
    """A fresh download asks for the whole file (no Range header)."""
    data = _payload(1000)
    local = tmp_path / "out"
    await Run(FakeFilesApi(data)).get(local)
    assert local.read_bytes() == data


async def test_hash_mismatch_removes_the_part_file(tmp_path: Path) -> None:
    """Bytes that do not hash to X-Content-SHA256: hash_mismatch, no part and no final file."""
    api = FakeFilesApi(_payload(5000))
    api.announced_sha = "0" * 64
    local = tmp_path / "out"
    with pytest.raises(CliError) as info:
        await Run(api).get(local)
    assert info.value.code == "hash_mismatch" and info.value.exit_code == 1
    assert not part_path(local).exists() and not local.exists()


async def test_short_body_keeps_the_part_file_and_a_rerun_resumes(tmp_path: Path) -> None:
    """A body 1000 bytes short fails incomplete_download, keeps the part; the rerun completes."""
    data = _payload(600_000)
    api = FakeFilesApi(data)
    api.short_by = 1000
    local = tmp_path / "out"
    with pytest.raises(CliError) as info:
        await Run(api).get(local)
    assert info.value.code == "incomplete_download"
    assert "resume with the same command" in info.value.message
    assert part_path(local).read_bytes() == data[:-1000]
    assert not local.exists()

    api.short_by = 0
    await Run(api).get(local)
    assert api.of("GET")[-1].headers["Range"] == f"bytes={len(data) - 1000}-"
    assert local.read_bytes() == data


async def test_existing_local_file_needs_overwrite(tmp_path: Path) -> None:
    """An existing LOCAL_PATH is refused before any request; with --overwrite it is replaced."""
    data = _payload(3000)
    api = FakeFilesApi(data)
    local = tmp_path / "out"
    local.write_bytes(b"old")
    with pytest.raises(CliError) as info:
        await Run(api).get(local)
    assert info.value.code == "file_exists" and api.requests == []
    assert local.read_bytes() == b"old"

    await Run(api).get(local, overwrite=True)
    assert local.read_bytes() == data


async def test_416_with_a_full_size_part_is_verified_and_finished(tmp_path: Path) -> None:
    """A .gtpart holding every byte gets 416; the CLI learns the hash, verifies and renames."""
    data = _payload(4096)
    local = tmp_path / "out"
    part_path(local).write_bytes(data)
    api = FakeFilesApi(data)
    result = await Run(api).get(local)
    assert [r.headers.get("Range") for r in api.of("GET")] == ["bytes=4096-", "bytes=4095-"]
    assert local.read_bytes() == data and not part_path(local).exists()
    assert result.sha256 == _sha(data)


async def test_416_with_a_full_size_part_of_other_content_is_a_hash_mismatch(
    tmp_path: Path,
) -> None:
    """A full-size part whose bytes differ from the remote file is deleted: hash_mismatch."""
    local = tmp_path / "out"
    part_path(local).write_bytes(b"y" * 4096)
    with pytest.raises(CliError) as info:
        await Run(FakeFilesApi(_payload(4096))).get(local)
    assert info.value.code == "hash_mismatch"
    assert not part_path(local).exists() and not local.exists()


async def test_200_answer_to_a_range_request_restarts_the_part(tmp_path: Path) -> None:
    """An API that ignores Range (200) replaces the part from byte 0; the result is correct."""
    data = _payload(9000)
    api = FakeFilesApi(data)
    api.ignore_range = True
    local = tmp_path / "out"
    part_path(local).write_bytes(b"garbage-prefix")
    run = Run(api)
    result = await run.get(local)
    assert local.read_bytes() == data and result.resumed_from == 0
    assert any("whole file" in n for n in run.notices)


# ------------------------------------------------------------------------------ the CLI
class RealFilesApi:
    """A real local HTTP server with the files routes (upload-offset 0, PUT, GET)."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.uploaded: dict[str, bytes] = {}
        self.abort_after: int | None = None
        self.stall = False
        """When true, a GET body stops after ``abort_after`` bytes until ``release`` is set."""
        self.release = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _json(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self._json(200, {"offset": 0})

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                path = parse_qs(urlsplit(self.path).query)["path"][0]
                api.uploaded[path] = body
                self._json(201, {"path": path, "size": len(body), "sha256": _sha(body)})

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(api.content)))
                self.send_header("X-Content-SHA256", _sha(api.content))
                self.end_headers()
                end = len(api.content) if api.abort_after is None else api.abort_after
                self.wfile.write(api.content[:end])
                self.wfile.flush()
                if api.stall:
                    api.release.wait(timeout=20)
                # HTTP/1.0 handler: returning closes the socket, short of Content-Length

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def real_api() -> Iterator[RealFilesApi]:
    api = RealFilesApi(_payload(3 * MiB))
    thread = threading.Thread(target=api.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api.server.shutdown()
        api.server.server_close()


def _env(api: RealFilesApi, tmp_path: Path) -> dict[str, str]:
    return {"GT_CLI_API_URL": api.url, "GT_CLI_TOKEN": "tok", "XDG_CONFIG_HOME": str(tmp_path)}


def test_put_and_get_print_the_result_on_stdout_and_progress_on_stderr_only(
    real_api: RealFilesApi, tmp_path: Path
) -> None:
    """stdout is exactly '<path> <size> <sha256>'; the progress bars go to stderr."""
    data = _payload(2 * MiB + 3)
    local = tmp_path / "up.bin"
    local.write_bytes(data)
    env = _env(real_api, tmp_path)
    put = CliRunner().invoke(app, ["put", "s1", str(local), REMOTE], env=env)
    assert put.exit_code == 0, put.stderr
    assert put.stdout == f"{REMOTE} {len(data)} {_sha(data)}\n"
    assert "upload up.bin" in put.stderr and "sha256 up.bin" in put.stderr
    assert real_api.uploaded[REMOTE] == data

    target = tmp_path / "down.bin"
    got = CliRunner().invoke(app, ["get", "s1", REMOTE, str(target)], env=env)
    assert got.exit_code == 0, got.stderr
    content = real_api.content
    assert got.stdout == f"{target} {len(content)} {_sha(content)}\n"
    assert "download down.bin" in got.stderr
    assert target.read_bytes() == content


def test_aborted_download_over_a_real_socket_keeps_the_part_and_exits_1(
    real_api: RealFilesApi, tmp_path: Path
) -> None:
    """A response cut short of Content-Length: exit 1, a clear message, the .gtpart kept."""
    real_api.abort_after = MiB + 17
    target = tmp_path / "down.bin"
    result = CliRunner().invoke(
        app, ["get", "s1", REMOTE, str(target)], env=_env(real_api, tmp_path)
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("gurutunnel: incomplete_download: ")
    assert "resume with the same command" in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""
    assert part_path(target).read_bytes() == real_api.content[: MiB + 17]
    assert not target.exists()


def test_get_refuses_an_existing_local_file_without_overwrite(
    real_api: RealFilesApi, tmp_path: Path
) -> None:
    """get onto an existing file exits 1 with file_exists and leaves it untouched."""
    target = tmp_path / "down.bin"
    target.write_bytes(b"keep me")
    result = CliRunner().invoke(
        app, ["get", "s1", REMOTE, str(target)], env=_env(real_api, tmp_path)
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("gurutunnel: file_exists: ")
    assert target.read_bytes() == b"keep me"


def test_ctrl_c_during_get_exits_130_keeps_the_part_and_says_resume(
    real_api: RealFilesApi, tmp_path: Path
) -> None:
    """SIGINT mid-download (a real CLI process): exit 130, the .gtpart kept, 'resume' said."""
    real_api.abort_after = MiB
    real_api.stall = True
    target = tmp_path / "down.bin"
    proc = subprocess.Popen(
        [executable("gurutunnel"), "get", "s1", REMOTE, str(target)],
        env={**os.environ, **_env(real_api, tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not part_path(target).exists() or part_path(target).stat().st_size < MiB:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        real_api.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, err.decode()
    assert out == b""
    assert err.decode().splitlines()[-1] == (
        f"gurutunnel: interrupted; the partial download is kept in {part_path(target)}: "
        "resume with the same command"
    )
    assert part_path(target).read_bytes() == real_api.content[:MiB]
