"""Fixtures for the API: the app in-process on real NATS and a real database, users, agents,
and a fake gateway that answers ``agent.<id>.cmd`` requests on the real bus."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import nats
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from gurutunnel_api.auth.models import Role, Technician
from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine, make_sessionmaker
from gurutunnel_api.main import create_app
from gurutunnel_api.migrations import upgrade_database
from gurutunnel_api.security import generate_agent_keypair, hash_password, mint_tech_token
from gurutunnel_protocol import ErrorCode, Subjects, new_id
from gurutunnel_protocol.envelope import decode_agent_command, encode
from gurutunnel_protocol.messages import (
    AgentConnected,
    AgentDisconnected,
    ChannelOpened,
    ChannelType,
    CommandReply,
    DisconnectReason,
    ExitReason,
    FileAck,
    FileCancel,
    FileChunk,
    FileDone,
    FileDownload,
    FileFailed,
    FileReady,
    FileUpload,
    OutputStream,
    PresenceEvent,
    SessionFrame,
    SessionUp,
    ShellOpen,
    Terminal,
    TerminalChunk,
    TerminalExit,
    TerminalStarted,
    TunnelClose,
    TunnelClosed,
    TunnelError,
    TunnelOpen,
    TunnelReady,
)
from gurutunnel_protocol.messages.bus import AgentReply

JWT_SECRET = "test-secret-" + "x" * 40
PASSWORD = "correct horse battery staple"


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], *, timeout_s: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until true, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    private, public = generate_agent_keypair()
    priv, pub = tmp_path / "agent-signing.pem", tmp_path / "agent-signing.pub.pem"
    priv.write_bytes(private)
    pub.write_bytes(public)
    return priv, pub


@pytest.fixture
def api_settings(
    database_url: str, nats_url: str, subject_prefix: str, key_files: tuple[Path, Path]
) -> ApiSettings:
    return ApiSettings(
        database_url=database_url,
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        jwt_secret=JWT_SECRET,
        agent_signing_key_file=key_files[0],
        open_timeout_s=0.5,
        close_timeout_s=0.5,
        request_timeout_s=5.0,
        presence_fetch_timeout_s=0.2,
        presence_nak_delay_s=0.1,
        shutdown_grace_s=3,
        # the fake gateways never heartbeat: the lease reaper must not close their sessions
        # mid-test (test_leases.py sets its own)
        lease_unknown_grace_s=600.0,
    )


@pytest.fixture
async def nc(nats_url: str, subject_prefix: str) -> AsyncIterator[NatsClient]:
    """The test's own NATS connection; deletes the JetStream state of this prefix afterwards."""
    client = await nats.connect(nats_url, connect_timeout=2)
    yield client
    subjects = Subjects(subject_prefix)
    js = client.jetstream(timeout=5)
    for name in (subjects.presence_stream, f"KV_{subjects.revocation_bucket}"):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
    await client.close()


@pytest.fixture
async def migrated(api_settings: ApiSettings) -> ApiSettings:
    await upgrade_database(api_settings)
    return api_settings


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient
    settings: ApiSettings


@contextlib.asynccontextmanager
async def running_api(settings: ApiSettings) -> AsyncIterator[Api]:
    """The app with its lifespan running, reached through an in-process ASGI client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield Api(app=app, client=client, settings=settings)


@pytest.fixture
async def api(migrated: ApiSettings, nc: NatsClient) -> AsyncIterator[Api]:
    async with running_api(migrated) as running:
        yield running


@dataclass
class User:
    id: str
    username: str
    role: Role
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@functools.cache
def password_hash() -> str:
    """One argon2 hash of PASSWORD for the whole run (hashing costs ~0.15 s on purpose)."""
    return hash_password(PASSWORD)


async def create_users(settings: ApiSettings, wanted: dict[str, Role]) -> dict[str, User]:
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as db, db.begin():
            techs = [
                Technician(id=new_id(), username=name, password_hash=password_hash(), role=role)
                for name, role in wanted.items()
            ]
            db.add_all(techs)
    finally:
        await engine.dispose()
    secret = settings.jwt_secret.get_secret_value()
    return {
        t.username: User(
            id=t.id,
            username=t.username,
            role=Role(t.role),
            token=mint_tech_token(secret=secret, tech_id=t.id, role=Role(t.role), ttl_s=300),
        )
        for t in techs
    }


@dataclass
class Users:
    admin: User
    tech: User
    tech2: User
    viewer: User


@pytest.fixture
async def users(migrated: ApiSettings) -> Users:
    made = await create_users(
        migrated,
        {"admin": Role.ADMIN, "tech": Role.TECH, "tech2": Role.TECH, "viewer": Role.VIEWER},
    )
    return Users(admin=made["admin"], tech=made["tech"], tech2=made["tech2"], viewer=made["viewer"])


@dataclass
class EnrolledAgent:
    id: str
    credential: str


async def enroll(api: Api, admin: User, name: str = "pc-01") -> EnrolledAgent:
    resp = await api.client.post("/api/v1/agents", json={"name": name}, headers=admin.headers)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    return EnrolledAgent(id=body["agent"]["id"], credential=body["credential"])


@pytest.fixture
async def agent(api: Api, users: Users) -> EnrolledAgent:
    return await enroll(api, users.admin)


Mode = Literal["ready", "busy", "never", "error"]


@dataclass
class _FakeUpload:
    frame: FileUpload
    data: bytearray
    acked: int


@dataclass
class _FakeDownload:
    frame: FileDownload
    acked: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class FakeFiles:
    """Plays the agent's file channels (``gurutunnel_agent.channels.files``) on the bus.

    ``file.upload`` / ``file.download`` are answered ``file.ready`` (or ``tunnel.error`` with
    ``refuse[path]``, ``file_exists``, ``file_not_found``, ``malformed_frame`` for an offset
    beyond the end); upload chunks from the down subject must come in order and within the
    window (else ``file.failed``), are acknowledged every ``ack_every_bytes`` and end with
    ``file.done`` (or ``file.failed{hash_mismatch}``); downloads are sent in ``chunk_bytes``
    within the window of the API's acks, ending with ``file.done``, or ``file.failed
    {hash_mismatch}`` once ``change_after_bytes`` were sent. ``file.cancel`` keeps an upload's
    bytes in ``partials`` (a later resume starts there) and answers ``file.failed``."""

    store: dict[str, bytes] = field(default_factory=dict)
    partials: dict[tuple[str, str], bytes] = field(default_factory=dict)
    refuse: dict[str, ErrorCode] = field(default_factory=dict)
    window_bytes: int = 64 * 1024
    chunk_bytes: int = 16 * 1024
    ack_every_bytes: int = 32 * 1024
    change_after_bytes: int | None = None
    max_unacked: int = 0
    """The most upload bytes the API ever had in flight beyond the last ack."""
    chunks: list[FileChunk] = field(default_factory=list)
    """Upload chunks received, in order."""
    acks: list[FileAck] = field(default_factory=list)
    """Download acks received, in order."""
    cancels: list[FileCancel] = field(default_factory=list)
    requests: list[FileUpload | FileDownload] = field(default_factory=list)
    uploads: dict[str, _FakeUpload] = field(default_factory=dict)
    downloads: dict[str, _FakeDownload] = field(default_factory=dict)


@dataclass
class FakeGateway:
    """Plays the gateway holding one agent: answers ``agent.<id>.cmd`` like a real agent would."""

    nc: NatsClient
    subjects: Subjects
    agent_id: str
    mode: Mode = "ready"
    gateway_id: str = field(default_factory=new_id)
    boot_id: str = field(default_factory=new_id)
    conn_id: str = field(default_factory=new_id)
    received: list[Any] = field(default_factory=list)
    held_session_id: str | None = None
    """With mode "busy": the session the agent says it holds."""
    before_ready: Callable[[], Awaitable[None]] | None = None
    """Awaited before a ready answer (to change the world while the open waits)."""
    on_terminal: Callable[[Terminal], Awaitable[list[SessionFrame] | TunnelError | None]] | None = (
        None
    )
    """Plays the agent for ``terminal.command``: a TunnelError refuses it, None never answers;
    a list answers ``terminal.started`` and then publishes those frames on the up subject."""
    output_before_started: bool = False
    """With a list from ``on_terminal``: publish those frames on the up subject (and flush) BEFORE
    answering ``terminal.started``, as a fast command on a real agent can (its first chunk races
    the answer: they travel on different subjects)."""
    inline_frames: int = 0
    """With a list from ``on_terminal``: that many of its first frames travel in the
    ``terminal.started`` answer (``output``, then ``exit``), as a real agent sends a short
    command; the rest is published on the up subject after the answer."""
    down: list[Any] = field(default_factory=list)
    """Frames received on the ``session.<id>.down`` subjects watched with ``watch_down``."""
    files: FakeFiles = field(default_factory=FakeFiles)
    """The agent's file channels (frames on the down subject reach it through ``watch_down``)."""
    _sub: Any = None
    _up_seq: int = 0
    _down_subs: list[Any] = field(default_factory=list)

    async def start(self) -> FakeGateway:
        self._sub = await self.nc.subscribe(
            self.subjects.agent_commands(self.agent_id), cb=self._on_command
        )
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        for transfer in self.files.downloads.values():
            if transfer.task is not None:
                transfer.task.cancel()
                with contextlib.suppress(BaseException):
                    await transfer.task
        for sub in self._down_subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._down_subs.clear()
        if self._sub is not None:
            await self._sub.unsubscribe()
            await self.nc.flush()
            self._sub = None

    async def watch_down(self, session_id: str) -> None:
        """Record every frame the API publishes on the session's down subject."""

        async def on_down(msg: Msg) -> None:
            frame = decode_agent_command(msg.data)
            self.down.append(frame)
            if isinstance(frame, FileChunk):
                await self._file_chunk(frame)
            elif isinstance(frame, FileAck):
                self._file_ack(frame)
            elif isinstance(frame, FileCancel):
                await self._file_cancel(frame)

        self._down_subs.append(
            await self.nc.subscribe(self.subjects.session_down(session_id), cb=on_down)
        )
        await self.nc.flush()

    async def publish_up(self, session_id: str, frame: SessionFrame) -> None:
        """Publish one agent frame of the session as the gateway would (``SessionUp``)."""
        up = SessionUp(
            agent_id=self.agent_id,
            gateway_id=self.gateway_id,
            boot_id=self.boot_id,
            conn_id=self.conn_id,
            session_id=session_id,
            seq=self._up_seq,
            frame=frame,
        )
        self._up_seq += 1
        await self.nc.publish(self.subjects.session_up(session_id), encode(up))

    async def _answer_terminal(self, msg: Msg, frame: Terminal) -> None:
        script = await self.on_terminal(frame) if self.on_terminal is not None else []
        if script is None:
            return
        inline: list[SessionFrame] = []
        if isinstance(script, list) and self.inline_frames:
            inline, script = script[: self.inline_frames], script[self.inline_frames :]
        answer: AgentReply = (
            script
            if isinstance(script, TunnelError)
            else TerminalStarted(
                req_id=frame.req_id,
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                pid=4242,
                output=[f for f in inline if isinstance(f, TerminalChunk)],
                exit=next((f for f in inline if isinstance(f, TerminalExit)), None),
            )
        )
        early = isinstance(script, list) and self.output_before_started
        if isinstance(script, list) and early:
            for up in script:
                await self.publish_up(frame.session_id, up)
            # on the server before the answer is even sent: only a subscriber made before the
            # request can have them
            await self.nc.flush()
        await msg.respond(encode(self._reply(answer)))
        if isinstance(script, list) and not early:
            for up in script:
                await self.publish_up(frame.session_id, up)
            await self.nc.flush()

    # ------------------------------------------------------------ file channels
    def _file_refusal(self, frame: FileUpload | FileDownload, code: ErrorCode) -> TunnelError:
        return TunnelError(
            req_id=frame.req_id,
            session_id=frame.session_id,
            channel_id=frame.channel_id,
            code=code,
            error=f"refused: {code.value}",
        )

    async def _file_failed(
        self, frame: FileUpload | FileDownload, code: ErrorCode, offset: int = 0
    ) -> None:
        self.files.uploads.pop(frame.channel_id, None)
        self.files.downloads.pop(frame.channel_id, None)
        await self.publish_up(
            frame.session_id,
            FileFailed(
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                code=code,
                error=code.value,
                offset=offset,
            ),
        )
        await self.nc.flush()

    async def _answer_upload(self, msg: Msg, frame: FileUpload) -> None:
        files = self.files
        held = files.partials.get((frame.path, frame.sha256), b"")
        code = files.refuse.get(frame.path)
        if code is None and frame.path in files.store and not frame.overwrite:
            code = ErrorCode.FILE_EXISTS
        if code is not None:
            await msg.respond(encode(self._reply(self._file_refusal(frame, code))))
            return
        files.uploads[frame.channel_id] = _FakeUpload(frame, bytearray(held), len(held))
        ready = FileReady(
            req_id=frame.req_id,
            session_id=frame.session_id,
            channel_id=frame.channel_id,
            offset=len(held),
            size=frame.size,
            window_bytes=files.window_bytes,
            chunk_bytes=files.chunk_bytes,
        )
        await msg.respond(encode(self._reply(ready)))
        if len(held) == frame.size:
            await self._upload_complete(files.uploads[frame.channel_id])

    async def _file_chunk(self, chunk: FileChunk) -> None:
        files = self.files
        upload = files.uploads.get(chunk.channel_id)
        if upload is None:
            return
        files.chunks.append(chunk)
        if chunk.offset != len(upload.data):
            await self._file_failed(upload.frame, ErrorCode.MALFORMED_FRAME)
            return
        upload.data += chunk.data
        unacked = len(upload.data) - upload.acked
        files.max_unacked = max(files.max_unacked, unacked)
        if unacked > files.window_bytes:
            await self._file_failed(upload.frame, ErrorCode.RATE_LIMITED)
            return
        done = len(upload.data) >= upload.frame.size
        if unacked >= files.ack_every_bytes or done:
            upload.acked = len(upload.data)
            await self.publish_up(
                upload.frame.session_id,
                FileAck(
                    session_id=chunk.session_id, channel_id=chunk.channel_id, offset=upload.acked
                ),
            )
        if done:
            await self._upload_complete(upload)
        await self.nc.flush()

    async def _upload_complete(self, upload: _FakeUpload) -> None:
        frame = upload.frame
        self.files.partials.pop((frame.path, frame.sha256), None)
        digest = hashlib.sha256(upload.data).hexdigest()
        if len(upload.data) != frame.size or digest != frame.sha256:
            await self._file_failed(frame, ErrorCode.HASH_MISMATCH)
            return
        self.files.uploads.pop(frame.channel_id, None)
        self.files.store[frame.path] = bytes(upload.data)
        await self.publish_up(
            frame.session_id,
            FileDone(
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                path=frame.path,
                size=frame.size,
                sha256=digest,
            ),
        )
        await self.nc.flush()

    async def _answer_download(self, msg: Msg, frame: FileDownload) -> None:
        files = self.files
        content = files.store.get(frame.path)
        code = files.refuse.get(frame.path)
        if code is None and content is None:
            code = ErrorCode.FILE_NOT_FOUND
        if code is None and content is not None and frame.offset > len(content):
            code = ErrorCode.MALFORMED_FRAME
        if code is not None or content is None:
            refusal = self._file_refusal(frame, code or ErrorCode.FILE_NOT_FOUND)
            await msg.respond(encode(self._reply(refusal)))
            return
        transfer = _FakeDownload(frame, acked=frame.offset)
        files.downloads[frame.channel_id] = transfer
        ready = FileReady(
            req_id=frame.req_id,
            session_id=frame.session_id,
            channel_id=frame.channel_id,
            offset=frame.offset,
            size=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            window_bytes=files.window_bytes,
            chunk_bytes=files.chunk_bytes,
        )
        await msg.respond(encode(self._reply(ready)))
        transfer.task = asyncio.create_task(self._send_download(transfer, content))

    async def _send_download(self, transfer: _FakeDownload, content: bytes) -> None:
        files, frame = self.files, transfer.frame
        sent = frame.offset
        while sent < len(content):
            room = files.window_bytes - (sent - transfer.acked)
            if room <= 0:
                transfer.wake.clear()
                try:
                    await asyncio.wait_for(transfer.wake.wait(), 5)
                except TimeoutError:
                    await self._file_failed(frame, ErrorCode.AGENT_TIMEOUT, transfer.acked)
                    return
                continue
            if files.change_after_bytes is not None and sent >= files.change_after_bytes:
                await self._file_failed(frame, ErrorCode.HASH_MISMATCH, transfer.acked)
                return
            n = min(files.chunk_bytes, len(content) - sent, room)
            await self.publish_up(
                frame.session_id,
                FileChunk(
                    session_id=frame.session_id,
                    channel_id=frame.channel_id,
                    offset=sent,
                    data=content[sent : sent + n],
                ),
            )
            sent += n
        files.downloads.pop(frame.channel_id, None)
        await self.publish_up(
            frame.session_id,
            FileDone(
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                path=frame.path,
                size=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
            ),
        )
        await self.nc.flush()

    def _file_ack(self, ack: FileAck) -> None:
        self.files.acks.append(ack)
        transfer = self.files.downloads.get(ack.channel_id)
        if transfer is not None and ack.offset > transfer.acked:
            transfer.acked = ack.offset
            transfer.wake.set()

    async def _file_cancel(self, cancel: FileCancel) -> None:
        files = self.files
        files.cancels.append(cancel)
        upload = files.uploads.pop(cancel.channel_id, None)
        if upload is not None:
            files.partials[(upload.frame.path, upload.frame.sha256)] = bytes(upload.data)
            await self._file_failed(upload.frame, ErrorCode.SESSION_CLOSED, len(upload.data))
            return
        transfer = files.downloads.pop(cancel.channel_id, None)
        if transfer is not None:
            if transfer.task is not None:
                transfer.task.cancel()
            await self._file_failed(transfer.frame, ErrorCode.SESSION_CLOSED, transfer.acked)

    def _reply(self, answer: AgentReply) -> CommandReply:
        return CommandReply(
            agent_id=self.agent_id,
            gateway_id=self.gateway_id,
            boot_id=self.boot_id,
            conn_id=self.conn_id,
            frame=answer,
        )

    async def _on_command(self, msg: Msg) -> None:
        frame = decode_agent_command(msg.data)
        self.received.append(frame)
        answer: AgentReply
        if isinstance(frame, Terminal):
            await self._answer_terminal(msg, frame)
            return
        if isinstance(frame, FileUpload | FileDownload):
            self.files.requests.append(frame)
            if isinstance(frame, FileUpload):
                await self._answer_upload(msg, frame)
            else:
                await self._answer_download(msg, frame)
            return
        if isinstance(frame, ShellOpen):
            answer = ChannelOpened(
                req_id=frame.req_id,
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                channel_type=ChannelType.SHELL,
            )
            await msg.respond(encode(self._reply(answer)))
            return
        if isinstance(frame, TunnelOpen):
            if self.mode == "never":
                return
            if self.mode == "busy":
                answer = TunnelError(
                    req_id=frame.req_id,
                    session_id=frame.session_id,
                    code=ErrorCode.TUNNEL_BUSY,
                    error="already in a session",
                    held_session_id=self.held_session_id,
                )
            elif self.mode == "error":
                answer = TunnelClosed(req_id=frame.req_id, session_id=frame.session_id)
            else:
                if self.before_ready is not None:
                    await self.before_ready()
                answer = TunnelReady(req_id=frame.req_id, session_id=frame.session_id)
        elif isinstance(frame, TunnelClose):
            answer = TunnelClosed(
                req_id=frame.req_id, session_id=frame.session_id, reason=frame.reason
            )
        else:
            return
        reply = CommandReply(
            agent_id=self.agent_id,
            gateway_id=self.gateway_id,
            boot_id=self.boot_id,
            conn_id=self.conn_id,
            frame=answer,
        )
        await msg.respond(encode(reply))

    def terminals(self) -> list[Terminal]:
        return [f for f in self.received if isinstance(f, Terminal)]

    def closes(self) -> list[TunnelClose]:
        return [f for f in self.received if isinstance(f, TunnelClose)]

    def connected(self, at: datetime | None = None) -> AgentConnected:
        return AgentConnected(
            agent_id=self.agent_id,
            gateway_id=self.gateway_id,
            boot_id=self.boot_id,
            conn_id=self.conn_id,
            event_id=new_id(),
            at=at or datetime.now(UTC),
        )

    def disconnected(self, conn_id: str | None = None) -> AgentDisconnected:
        return AgentDisconnected(
            agent_id=self.agent_id,
            gateway_id=self.gateway_id,
            boot_id=self.boot_id,
            conn_id=conn_id or self.conn_id,
            event_id=new_id(),
            at=datetime.now(UTC),
            reason=DisconnectReason.CLOSED,
        )


@pytest.fixture
async def gateway(
    nc: NatsClient, subject_prefix: str, agent: EnrolledAgent
) -> AsyncIterator[FakeGateway]:
    gw = await FakeGateway(nc=nc, subjects=Subjects(subject_prefix), agent_id=agent.id).start()
    yield gw
    await gw.stop()


class Presence:
    """Publishes presence events on JetStream and waits until the API acknowledged them."""

    def __init__(self, nc: NatsClient, subjects: Subjects) -> None:
        self.js: JetStreamContext = nc.jetstream(timeout=5)
        self.subjects = subjects

    async def publish(self, event: PresenceEvent, *, msg_id: str | None = None) -> int:
        ack = await self.js.publish(
            self.subjects.presence(event.agent_id),
            encode(event),
            headers={"Nats-Msg-Id": msg_id or event.event_id},
        )
        return int(ack.seq)

    async def wait_handled(self, seq: int, timeout_s: float = 5.0) -> None:
        async def acked() -> bool:
            info = await self.js.consumer_info(
                self.subjects.presence_stream, self.subjects.presence_consumer
            )
            return info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= seq

        await wait_until(acked, timeout_s=timeout_s, what=f"presence seq {seq} acked")

    async def send(self, event: PresenceEvent, *, msg_id: str | None = None) -> None:
        await self.wait_handled(await self.publish(event, msg_id=msg_id))


@pytest.fixture
def presence(nc: NatsClient, subject_prefix: str) -> Presence:
    return Presence(nc, Subjects(subject_prefix))


def chunk(
    t: Terminal, seq: int, data: bytes, stream: OutputStream = OutputStream.STDOUT
) -> TerminalChunk:
    """A ``terminal.chunk`` of the command ``t``."""
    return TerminalChunk(
        session_id=t.session_id, channel_id=t.channel_id, seq=seq, stream=stream, data=data
    )


def exit_frame(
    t: Terminal,
    seq: int,
    *,
    reason: ExitReason = ExitReason.EXITED,
    exit_code: int | None = 0,
    stdout_bytes: int = 0,
    stderr_bytes: int = 0,
    truncated: bool = False,
) -> TerminalExit:
    """The ``terminal.exit`` of the command ``t``."""
    return TerminalExit(
        session_id=t.session_id,
        channel_id=t.channel_id,
        seq=seq,
        reason=reason,
        exit_code=exit_code,
        truncated=truncated,
        duration_s=0.01,
        stdout_bytes=stdout_bytes,
        stderr_bytes=stderr_bytes,
    )


@dataclass
class LiveApi:
    """The app served by a real uvicorn on a free port (real HTTP and WebSocket sockets)."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: ApiSettings
    url: str

    def ws_url(self, session_id: str, ticket: str) -> str:
        return (
            f"{self.url.replace('http://', 'ws://')}/api/v1/tunnel/{session_id}/ws?ticket={ticket}"
        )


@contextlib.asynccontextmanager
async def serving_api(settings: ApiSettings) -> AsyncIterator[LiveApi]:
    """``create_app(settings)`` under uvicorn (lifespan included) on 127.0.0.1, port 0."""
    import uvicorn

    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_config=None,
            access_log=False,
            # a stream or WebSocket a test left open must not hold up the teardown
            timeout_graceful_shutdown=settings.shutdown_grace_s,
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if task.done():
                task.result()
                raise AssertionError("uvicorn stopped before it started")
            if time.monotonic() > deadline:
                raise AssertionError("uvicorn did not start within 20 s")
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield LiveApi(app=app, client=client, settings=settings, url=url)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
