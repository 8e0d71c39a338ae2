"""Pieces for fault tests: private NATS and PostgreSQL a test may kill, a real-process stack.

Contract:
- :class:`PrivateNats` is a ``nats-server`` (the wheel's) with JetStream in a data directory of
  its own, on a port of its own that ``start`` reuses after ``stop``/``kill``: clients reconnect
  to the same URL and the streams (file storage) survive the restart.
- :class:`PostgresCluster` is a cluster of its own made with ``initdb``/``pg_ctl`` (as root, run
  through ``runuser -u postgres``) that a test may ``stop``, ``start``, ``restart`` and
  ``pause``/``resume`` (SIGSTOP/SIGCONT of the postmaster and every backend). Missing binaries
  raise :class:`tests.support.services.PostgresUnavailable`; the fixture turns that into a skip
  with the reason, or a failure under ``GT_REQUIRE_POSTGRES=1``.
- :func:`build_stack` makes a :class:`devstack.stack.Stack` (the real ``gurutunnel-api serve``,
  ``gurutunnel-gateway`` and ``gurutunnel-agent`` console scripts) with its signing keys made in
  this process (no ``keygen`` process per stack); :func:`create_admin` writes the first admin
  straight into the migrated database.
- Every wait here is bounded (:func:`eventually`), every HTTP call has a timeout.
- :class:`ExecStream` reads one NDJSON exec stream in the background; :func:`silent_losses`
  checks a counter's output against the stream's gap markers (output lost without a marker).
- :func:`scan_logs` greps log files for planted secrets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from devstack.stack import API_PREFIX, EnrolledAgent, Stack, StackConfig
from tests.support.services import NatsProcess, PostgresUnavailable, free_port

HTTP_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------- bounded waits
async def eventually(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
) -> float:
    """Await ``check`` until it is true; the seconds it took. ``AssertionError`` past the bound."""
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        await asyncio.sleep(interval_s)


async def status_of(url: str, timeout_s: float = 3.0) -> tuple[int | None, str | None]:
    """(HTTP status, error code) of a GET, or (None, exception name) when nothing answered."""
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            r = await client.get(url)
    except httpx.HTTPError as exc:
        return None, type(exc).__name__
    code = None
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        code = r.json()["error"]["code"]
    return r.status_code, code


# ---------------------------------------------------------------------- NATS
class PrivateNats(NatsProcess):
    """A NATS server of the test's own; ``start`` after ``stop``/``kill`` reuses port and store."""

    def kill(self) -> None:
        """SIGKILL, as a crashed or evicted server: clients see their sockets end at once."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


# ---------------------------------------------------------------------- PostgreSQL
class PostgresCluster:
    """A PostgreSQL cluster of the test's own (see the module contract)."""

    def __init__(self) -> None:
        initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
        if not initdb or not pg_ctl:
            raise PostgresUnavailable("initdb/pg_ctl not found: cannot start a private cluster")
        self._initdb, self._pg_ctl = initdb, pg_ctl
        self._prefix: list[str] = []
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # initdb refuses to run as root: run the cluster as the postgres system user
            if not shutil.which("runuser"):
                raise PostgresUnavailable("running as root and runuser is missing")
            self._prefix = ["runuser", "-u", "postgres", "--"]
        self.base = tempfile.mkdtemp(prefix="gt-fault-pg-")
        self.data = os.path.join(self.base, "data")
        self.port = free_port()
        self._paused: list[psutil.Process] = []

    @property
    def server_url(self) -> str:
        """``postgresql://`` URL of the ``postgres`` database (for creating test databases)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout_s: float = 60) -> None:
        result = subprocess.run(
            [*self._prefix, *argv], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr.strip()[:500]}")

    def init(self) -> None:
        try:
            if self._prefix:
                shutil.chown(self.base, user="postgres")
            self._run(self._initdb, "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        except (RuntimeError, LookupError, OSError) as exc:
            raise PostgresUnavailable(f"initdb failed: {exc}") from exc
        self.start()

    def start(self) -> None:
        self._run(
            self._pg_ctl,
            "-D",
            self.data,
            "-o",
            f"-p {self.port} -k {self.base} -h 127.0.0.1 -c fsync=off",
            "-l",
            os.path.join(self.base, "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop``: ``fast`` ends every session at once; ``immediate`` is a crash."""
        self.resume()  # a paused postmaster cannot stop
        self._run(self._pg_ctl, "-D", self.data, "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.resume()
        self._run(
            self._pg_ctl, "-D", self.data, "-m", "fast", "-w", "-l", self._log_path(), "restart"
        )

    def _log_path(self) -> str:
        return os.path.join(self.base, "log")

    def postmaster(self) -> psutil.Process:
        with open(os.path.join(self.data, "postmaster.pid")) as fh:
            return psutil.Process(int(fh.readline().strip()))

    def pause(self) -> int:
        """SIGSTOP the postmaster (no new backend is forked) and then every child it has: open
        connections hang mid-query and new ones hang in their handshake. Returns how many."""
        master = self.postmaster()
        master.send_signal(signal.SIGSTOP)
        self._paused = [master]
        for child in master.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGSTOP)
                self._paused.append(child)
        return len(self._paused)

    def resume(self) -> None:
        paused, self._paused = self._paused, []
        for proc in reversed(paused):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    async def create_database(self, name: str) -> str:
        """Create ``name``; its SQLAlchemy (asyncpg) URL."""
        conn = await asyncpg.connect(self.server_url, timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"


# ---------------------------------------------------------------------- the stack
def build_stack(
    root: Path,
    *,
    nats_url: str,
    database_url: str | None,
    subject_prefix: str,
    api_env: dict[str, str],
    gateway_env: dict[str, str],
    agent_env: dict[str, str],
) -> Stack:
    """A :class:`Stack` whose agent signing keys already exist (made here, not by a process)."""
    from gurutunnel_api.security import generate_agent_keypair

    stack = Stack(
        StackConfig(
            root=root,
            nats_url=nats_url,
            database_url=database_url,
            subject_prefix=subject_prefix,
            api_env=api_env,
            gateway_env=gateway_env,
            agent_env=agent_env,
        )
    )
    private_pem, public_pem = generate_agent_keypair()
    stack.private_key.write_bytes(private_pem)
    stack.private_key.chmod(0o600)
    stack.public_key.write_bytes(public_pem)
    return stack


async def create_admin(stack: Stack, username: str, password: str) -> None:
    """The first admin, written into the stack's (migrated) database from this process."""
    from gurutunnel_api.auth.models import Role
    from gurutunnel_api.auth.service import upsert_technician
    from gurutunnel_api.config import ApiSettings
    from gurutunnel_api.db import make_engine, make_sessionmaker
    from gurutunnel_api.security import PasswordHashing

    settings = ApiSettings(database_url=stack.database_url, jwt_secret=stack.jwt_secret)
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as db:
            await upsert_technician(
                db,
                passwords=PasswordHashing(1),
                username=username,
                password=password,
                role=Role.ADMIN,
            )
    finally:
        await engine.dispose()


@dataclass
class Api:
    """An HTTP client of the stack's API with a technician's token."""

    stack: Stack
    token: str
    client: httpx.AsyncClient

    @classmethod
    @contextlib.asynccontextmanager
    async def login(cls, stack: Stack, username: str, password: str) -> AsyncIterator[Api]:
        async with httpx.AsyncClient(
            base_url=f"{stack.api_url}{API_PREFIX}", timeout=HTTP_TIMEOUT_S
        ) as client:
            r = await client.post("/auth/token", json={"username": username, "password": password})
            assert r.status_code == 200, r.text
            token = r.json()["access_token"]
            client.headers["Authorization"] = f"Bearer {token}"
            yield cls(stack, token, client)

    async def enroll(self, name: str) -> EnrolledAgent:
        r = await self.client.post("/agents", json={"name": name})
        assert r.status_code == 201, r.text
        body = r.json()
        return EnrolledAgent(id=body["agent"]["id"], name=name, credential=body["credential"])

    async def agent(self, agent_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/agents/{agent_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def wait_online(self, agent_id: str, online: bool = True, timeout_s: float = 15) -> None:
        async def reached() -> bool:
            r = await self.client.get(f"/agents/{agent_id}")
            return r.status_code == 200 and r.json()["online"] is online

        await eventually(reached, timeout_s=timeout_s, what=f"agent online={online}")

    async def open(self, agent_id: str) -> str:
        r = await self.client.post("/tunnel/open", json={"agent_id": agent_id})
        assert r.status_code == 201, r.text
        assert r.json()["state"] == "active", r.text
        session_id: str = r.json()["id"]
        return session_id

    async def session(self, session_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/tunnel/status/{session_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def wait_closed(self, session_id: str, timeout_s: float) -> dict[str, Any]:
        """Poll until the session is ``closed``; the session as it was then."""
        found: dict[str, Any] = {}

        async def closed() -> bool:
            found.update(await self.session(session_id))
            return bool(found["state"] == "closed")

        await eventually(closed, timeout_s=timeout_s, what=f"session {session_id} closed")
        return found


# ---------------------------------------------------------------------- NDJSON exec streams
COUNTER_COMMAND = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.02; done"
"""Prints 0, 1, 2, ... one line every 20 ms until cancelled (the agent's shell)."""


@dataclass
class ExecStream:
    """One ``POST /tunnel/{id}/exec?stream=true`` read in the background, event by event."""

    events: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None

    @property
    def channel_id(self) -> str | None:
        for event in self.events:
            if event["event"] == "started":
                channel: str = event["channel_id"]
                return channel
        return None

    @property
    def last(self) -> dict[str, Any] | None:
        return self.events[-1] if self.events else None

    def output(self) -> bytes:
        return b"".join(base64.b64decode(e["data"]) for e in self.events if e["event"] == "chunk")

    def lines(self) -> int:
        return self.output().count(b"\n")

    async def wait_lines(self, count: int, timeout_s: float) -> None:
        async def enough() -> bool:
            if self.ended.is_set():
                raise AssertionError(f"stream ended early: {self.events[-3:]} {self.error!r}")
            return self.lines() >= count

        await eventually(enough, timeout_s=timeout_s, what=f"{count} lines of output")

    async def wait_end(self, timeout_s: float) -> dict[str, Any]:
        """The last event once the body ended (bounded)."""
        try:
            await asyncio.wait_for(self.ended.wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"stream did not end within {timeout_s}s") from None
        assert self.last is not None, f"stream ended without an event: {self.error!r}"
        return self.last


@contextlib.asynccontextmanager
async def exec_stream(api: Api, session_id: str, body: dict[str, Any]) -> AsyncIterator[ExecStream]:
    """Start a streamed exec and read it until it ends (or the block exits, which drops it)."""
    stream = ExecStream()

    async def read() -> None:
        try:
            async with api.client.stream(
                "POST",
                f"/tunnel/{session_id}/exec",
                json=body,
                params={"stream": "true"},
                timeout=httpx.Timeout(HTTP_TIMEOUT_S, read=60.0),
            ) as r:
                if r.status_code != 200:
                    await r.aread()
                    stream.events.append({"event": "http", "status": r.status_code, "body": r.text})
                    return
                async for line in r.aiter_lines():
                    if line.strip():
                        stream.events.append(json.loads(line))
        except (httpx.HTTPError, ValueError) as exc:
            stream.error = exc
        finally:
            stream.ended.set()

    stream.task = asyncio.create_task(read(), name=f"exec-stream-{session_id}")
    try:
        yield stream
    finally:
        if not stream.task.done():
            stream.task.cancel()
        with contextlib.suppress(BaseException):
            await stream.task


def silent_losses(events: Iterable[dict[str, Any]]) -> int:
    """How many counter lines (:data:`COUNTER_COMMAND`) went missing WITHOUT a gap marker.

    The output is cut into segments at each ``gap`` event; inside a segment the numbers must be
    consecutive (a line cut by a gap at the segment's edge is not judged), and across a segment
    boundary without a gap they must go on too. 0 means every loss was shown."""
    segments: list[bytes] = [b""]
    for event in events:
        if event["event"] == "gap":
            segments.append(b"")
        elif event["event"] == "chunk" and event["stream"] == "stdout":
            segments[-1] += base64.b64decode(event["data"])
    missing = 0
    for index, segment in enumerate(segments):
        lines = segment.split(b"\n")
        lines.pop()  # after the last newline: a partial line or nothing
        if index > 0 and lines:
            lines.pop(0)  # may have lost its start to the gap
        numbers = [int(line) for line in lines if line.strip().isdigit()]
        if index == 0 and numbers and numbers[0] != 0:
            missing += numbers[0]
        for before, after in itertools.pairwise(numbers):
            if after != before + 1:
                missing += abs(after - before - 1) or 1
    return missing


# ---------------------------------------------------------------------- logs
def scan_logs(paths: Iterable[Path], secrets: dict[str, str]) -> list[str]:
    """``"<file>: <secret name>"`` for every planted secret found in any of the files."""
    hits: list[str] = []
    for path in paths:
        text = path.read_text(errors="replace")
        for name, secret in secrets.items():
            if secret and secret in text:
                hits.append(f"{path.name}: {name}")
    return hits
