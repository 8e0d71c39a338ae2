"""The agent's connect loop: one WebSocket to a gateway, held for ever, reconnected with backoff.

Contract:
- ``AgentClient(settings).run()`` connects to one of ``settings.connect_urls`` with the
  credential in ``Authorization: Bearer ...`` (never in the URL), waits for ``welcome``
  (``welcome_timeout_s``),
  then sends a ``heartbeat`` at once and every interval, in both modes, carrying the tunnel mode,
  the session id and host metrics. The interval is the smaller of ``heartbeat_interval_s`` and
  the one the gateway's ``welcome`` asks for.
- Host metrics are collected on one dedicated worker thread, at most one collection in flight
  (a collection still running, e.g. ``disk_usage`` hung on a dead mount, is reused, never
  duplicated), so a hang neither piles up threads nor starves the default executor that
  resolves host names for ``connect()``. The last metrics live on the client, across
  reconnects. Heartbeats never stop for metrics: a new collection is awaited at most
  ``metrics_timeout_s``, a still-hung one not at all; the beat carries the last known metrics,
  or, before any collection ever finished, a minimal snapshot built without the hung call
  (``minimal_host_metrics``).
- One reader loop per connection decodes server frames; ``TunnelManager.handle`` answers tunnel
  frames; ``welcome``, ``error`` and ``reconnect`` are handled here. A malformed frame, or a
  binary one (version 1 is text only), is logged (error code and size, never its content) and
  skipped; the loop goes on.
- Every frame leaves through :meth:`AgentClient._send`: one lock (frames never interleave and keep
  their order) and ``send_timeout_s`` (a gateway that stops reading gets its socket aborted).
- Failure classes: HTTP 401/403 at the upgrade, and a close code in the fatal range
  (``close_is_fatal``), raise :class:`FatalRefusal` out of ``run()``; everything else (refused
  TCP, timeouts, other HTTP statuses, resets, closes in the reconnect ranges, an unreadable
  credential file) is retried for ever. ``reconnect{delay_ms}`` closes the socket (1000) and
  reconnects after ``max(min(delay_ms, backoff_max_s), next backoff delay)`` plus up to
  ``reconnect_jitter_s``: a gateway cannot park the agent for longer than the backoff cap, and
  a gateway that accepts then says ``reconnect{0}`` over and over still gets backed off; the
  agent's own jitter spreads a fleet even when a gateway sends everyone the same delay.
- Failover: the URLs are tried in turn (round robin, every attempt after its backoff delay).
  The agent moves to the next URL after an attempt that got no ``welcome`` (refused, timed
  out, unreachable) and after a connection the gateway ended as going away (``reconnect``
  frame, close 4001 draining, 4002 lease lost); after any other end of a working connection
  it tries the same URL again first.
- Every disconnect force-closes the tunnel (the session cannot outlive its socket).
- Channels (``gurutunnel_agent.channels``): the client carries out the actions the tunnel
  returns. ``terminal.command`` first checks and opens its working directory on a worker
  thread (``open_cwd``, bounded by ``cwd_timeout_s``; refused -> ``tunnel.error
  {cwd_not_allowed}`` and the channel released), spawns the process, answers
  ``terminal.started{pid}`` (same ``req_id``; when the request says ``inline_result``, the
  channel's task sends it once the command ended or ``inline_result_window_s`` passed, so that
  a short command's output and exit travel in it, while the reader goes on; the channel's
  task ends only after that answer, so ``channel.closed`` and ``tunnel.closed`` still follow
  it), then streams; ``shell.open`` answers
  ``channel.opened{shell}``. The channel's output is opened even if that answer fails, so the
  channel still ends. Each channel runs as one task of the connection, emitting through
  :meth:`AgentClient._send` (awaited: back-pressure from a slow socket reaches the pipe). A
  finished channel is released in the tunnel with its registration token (never a newer channel
  reusing the id), and leaves the connection's table only once its task is done.
  ``channel.close`` and ``tunnel.close`` kill the process trees and wait for the exit frames
  (bounded) before their answer; a channel still running at the bound is cancelled (SIGKILL)
  and its exit frame is sent on its behalf (best effort) before the answer. When the
  connection ends, every channel is ended (``session_closed``, trees killed) and nothing more
  is sent for it.
- File transfers (``gurutunnel_agent.channels.files``): ``file.upload`` / ``file.download``
  start an :class:`UploadChannel` / :class:`DownloadChannel` (``file_allowlist``, limits from
  the ``file_*`` settings, built once) as one task of the connection running ``serve()``,
  which answers the request itself (``file.ready`` or ``tunnel.error``; no
  ``terminal.started``) and ends with exactly one ``file.done`` or ``file.failed``; the
  channel is released in the tunnel when the task ends. ``file.chunk`` goes to the upload's
  ``receive`` and ``file.ack`` to the download's ``ack`` (both non-blocking: the reader never
  waits on a disk). Their filesystem work runs on the client's own bounded thread pool
  (``max_channels`` threads, ``gurutunnel-files``), never the default executor that resolves
  host names; preparing a transfer (resolve, open, hash) is bounded by
  ``file_ack_timeout_s`` (``tunnel.error{agent_timeout}`` past it). ``file.cancel``,
  ``channel.close`` and ``tunnel.close`` cancel the runtime (``file.failed{session_closed}``);
  on socket loss every file runtime is cancelled (``connection lost``) and its task awaited
  (bounded like the other channels), nothing more is sent.
- ``terminal.ack`` goes to the command's or shell's output window (``OutputWindow.ack``, never
  blocking the reader).
- Shell input (``tunnel.data``) is only queued by the reader (``ShellChannel.feed``); each shell
  writes its own queue, so a shell that stops reading cannot stall the reader, the other
  channels or ``tunnel.close``. A full queue answers ``tunnel.error{agent_backpressure}``.
- ``stop()`` (signals) ends ``run()`` promptly: the socket is closed with code 1000.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.http11 import Response

from gurutunnel_protocol import CloseCode, ErrorCode, ProtocolError, close_is_fatal
from gurutunnel_protocol.envelope import decode_server_to_agent, encode_text
from gurutunnel_protocol.messages import (
    AgentToServer,
    ChannelOpened,
    ChannelType,
    ErrorFrame,
    ExitReason,
    Heartbeat,
    HostMetrics,
    Reconnect,
    TerminalStarted,
    TunnelError,
    Welcome,
)

from .channels.files import DownloadChannel, FileLimits, UploadChannel
from .channels.output import Emit
from .channels.shell import ShellChannel
from .channels.terminal import CommandChannel, CommandLimits, WorkDir, open_cwd
from .config import AgentSettings, CredentialError
from .metrics import (
    agent_version,
    collect_host_metrics,
    minimal_host_metrics,
    prime_cpu_percent,
)
from .tunnel import (
    ACTION_TYPES,
    Action,
    CwdNotAllowed,
    EndSession,
    FileAcked,
    FileData,
    OutputAcked,
    ResizeShell,
    ShellInput,
    StartCommand,
    StartDownload,
    StartShell,
    StartUpload,
    StopChannel,
    TunnelManager,
    TunnelStateError,
)

log = logging.getLogger(__name__)

# A guard against a gateway asking for a busy loop of heartbeats; far below any sane interval.
_MIN_HEARTBEAT_INTERVAL_S = 0.01


class FatalRefusal(Exception):
    """The gateway refused this agent for good (bad or revoked credential): do not retry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Backoff:
    """Capped exponential backoff with full jitter.

    Delay n is ``uniform(0, min(max_s, initial_s * factor**n))`` ("full jitter", AWS
    Architecture Blog, "Exponential Backoff And Jitter"), so a fleet of agents cut off together
    spreads its reconnects instead of storming the next gateway.

    Why not websockets' reconnecting iterator (``async for ws in connect(...)``)? Its delays are
    configurable (``reconnect_delays``) but it only backs off when the *handshake* fails: after a
    connection that opened and then dropped it reconnects at once, so a gateway that accepts and
    closes (draining, lease lost, crash loop) would be re-dialled in a tight loop; it also cannot
    apply a server-dictated ``reconnect{delay_ms}`` or classify close codes. So the loop is ours,
    and each attempt uses ``connect()`` as an async context manager.
    """

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        factor: float,
        *,
        jitter: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call advances the exponent."""
        # cap the exponent so factor**attempt cannot overflow after days of retries
        ceiling = min(self.max_s, self.initial_s * self.factor ** min(self._attempt, 64))
        self._attempt += 1
        return self._rng.uniform(0, ceiling) if self.jitter else ceiling

    def reset(self) -> None:
        self._attempt = 0


@dataclass
class _Connection:
    """State of one WebSocket connection (dropped with it)."""

    ws: ClientConnection
    opened_at: float
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    welcome: Welcome | None = None
    heartbeat: asyncio.Task[None] | None = None
    reconnect_delay_s: float | None = None
    close_code: int | None = None
    alive: bool = True
    """False once the socket is gone: channel output is dropped, not sent."""
    channels: dict[str, _Running] = field(default_factory=dict)
    """Running channels of this connection's session, by channel id."""


FileRuntime = UploadChannel | DownloadChannel
"""File transfer runtimes: no ``output`` (they end with ``file.done``/``file.failed``)."""
Runtime = CommandChannel | ShellChannel | FileRuntime
"""The channel runtimes (commands and shells satisfy ``channels.ChannelRuntime``)."""


def _has_ended(runtime: Runtime) -> bool:
    """Whether the runtime sent its one final frame (exit frame, file.done/failed)."""
    if isinstance(runtime, UploadChannel | DownloadChannel):
        return runtime.finished
    return runtime.output.exited


@dataclass
class _Running:
    session_id: str
    channel_id: str
    token: int
    runtime: Runtime
    task: asyncio.Task[None]


async def _run_answered(
    runtime: CommandChannel | ShellChannel, answer: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Run a channel with its answer beside it; the channel ends only once its answer is sent
    (or given up): an exit frame held for the answer leaves in it, ahead of anything the reader
    sends after the channel ended (``channel.closed``, ``tunnel.closed``)."""
    answering = asyncio.create_task(
        answer(), name=f"agent-channel-answer-{runtime.output.channel_id}"
    )
    answering.add_done_callback(_answer_done)
    try:
        await runtime.run()
    except asyncio.CancelledError:
        # the channel is being killed (a straggler, the connection's end): its answer too
        answering.cancel()
        raise
    finally:
        try:
            await asyncio.wait({answering})
        except asyncio.CancelledError:
            # cancelled while the answer is still on its way: never leave it running behind
            # channel.closed / tunnel.closed (_answer_done reads how it ended)
            answering.cancel()
            await asyncio.wait({answering})
            raise


def _answer_done(answering: asyncio.Task[None]) -> None:
    """Read how an answer ended (whoever stopped waiting for it): a closed socket is the
    reader's to notice; anything else is a bug worth a trace."""
    if answering.cancelled():
        return
    failure = answering.exception()
    if failure is not None and not isinstance(failure, ConnectionClosed):
        log.error(
            "channel answer failed",
            extra={"task": answering.get_name()},
            exc_info=(type(failure), failure, failure.__traceback__),
        )


def _refusal_reason(response: Response) -> str:
    """``credential refused by gateway (HTTP 401 unauthorized)``, from the gateway's answer."""
    status = response.status_code
    code: str | None = None
    try:
        body: Any = json.loads(response.body[:4096])
        candidate = body["error"]["code"]
        if candidate in ErrorCode.__members__.values():
            code = str(candidate)
    except (ValueError, KeyError, TypeError):
        pass  # a body that is not the documented JSON error: fall back to the HTTP phrase
    if code is None:
        try:
            code = HTTPStatus(status).phrase.lower()
        except ValueError:
            code = "refused"
    return f"credential refused by gateway (HTTP {status} {code})"


def _close_reason(code: int, reason: str) -> str:
    try:
        name = CloseCode(code).name.lower()
    except ValueError:
        name = "fatal close code"
    # the reason comes from the network: keep it short and printable
    shown = "".join(ch for ch in reason[:123] if ch.isprintable())
    detail = f": {shown}" if shown else ""
    return f"gateway closed the connection with code {code} ({name}{detail})"


class AgentClient:
    """The connect loop of one agent (see module docstring for the contract)."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        tunnel: TunnelManager | None = None,
        metrics: Callable[[], HostMetrics] = collect_host_metrics,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.tunnel = (
            tunnel if tunnel is not None else TunnelManager(max_channels=settings.max_channels)
        )
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._stop = asyncio.Event()
        self.connection: ClientConnection | None = None
        """The open WebSocket, if any (for observation; never send on it directly)."""
        self.connections_made = 0
        """How many upgrades succeeded (observability and tests)."""
        self._urls = settings.connect_urls
        self._url_index = 0
        self.last_metrics: HostMetrics | None = None
        """The last host metrics collected (kept across reconnects)."""
        # One thread: a hung collection blocks only further collections, which are not started
        # while it runs anyway (see _collect_metrics).
        self._metrics_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="gurutunnel-metrics"
        )
        self._metrics_inflight: asyncio.Future[HostMetrics] | None = None
        # Working-directory checks are filesystem calls (a hung mount blocks them): off the
        # loop, on threads of their own so they cannot starve the default executor either.
        self._cwd_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gurutunnel-cwd")
        # File transfers: the same reasoning; each transfer has at most one call in flight, so
        # max_channels threads serve a full session while a hung disk cannot take more
        self._file_executor = ThreadPoolExecutor(
            max_workers=settings.max_channels, thread_name_prefix="gurutunnel-files"
        )
        self._file_limits = FileLimits(
            max_file_bytes=settings.max_file_bytes,
            chunk_bytes=settings.file_chunk_bytes,
            window_bytes=settings.file_window_bytes,
            ack_timeout_s=settings.file_ack_timeout_s,
            fsync_every_bytes=settings.file_fsync_every_bytes,
            prepare_timeout_s=settings.file_ack_timeout_s,
        )

    def stop(self) -> None:
        """Ask ``run()`` to close the socket with code 1000 and return."""
        self._stop.set()

    async def run(self) -> None:
        """Connect and reconnect until ``stop()``; raises :class:`FatalRefusal` when refused."""
        s = self.settings
        backoff = Backoff(
            s.backoff_initial_s,
            s.backoff_max_s,
            s.backoff_factor,
            jitter=s.backoff_jitter,
            rng=self._rng,
        )
        prime_cpu_percent()
        try:
            await self._connect_loop(backoff)
        finally:
            # a hung collection cannot be interrupted; nothing waits for it (the thread ends
            # with the call, or with the process)
            self._metrics_executor.shutdown(wait=False, cancel_futures=True)
            self._cwd_executor.shutdown(wait=False, cancel_futures=True)
            self._file_executor.shutdown(wait=False, cancel_futures=True)
        log.info("agent stopped")

    def _reconnect_delay(self, conn: _Connection | None, backoff: Backoff) -> float:
        """The wait before the next attempt (see module docstring)."""
        s = self.settings
        if conn is None or conn.reconnect_delay_s is None:
            return backoff.next_delay()
        asked = min(conn.reconnect_delay_s, s.backoff_max_s)
        return max(asked, backoff.next_delay()) + self._rng.uniform(0, s.reconnect_jitter_s)

    @property
    def gateway_url(self) -> str:
        """The URL the next attempt goes to."""
        return self._urls[self._url_index]

    def _next_url(self, conn: _Connection | None) -> None:
        """Move to the next URL unless ``conn`` was a working connection that just dropped."""
        going_away = conn is not None and (
            conn.reconnect_delay_s is not None
            or conn.close_code in (CloseCode.DRAINING, CloseCode.LEASE_LOST)
        )
        if conn is None or conn.welcome is None or going_away:
            self._url_index = (self._url_index + 1) % len(self._urls)

    async def _connect_loop(self, backoff: Backoff) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            conn: _Connection | None = None
            try:
                conn = await self._attempt()
            except FatalRefusal:
                raise
            except Exception:
                # a bug must not end an agent that nobody can reach to restart: log, back off
                log.exception("unexpected error in the connect loop; reconnecting")
            finally:
                self.connection = None
                dropped = self.tunnel.force_close()
                if dropped is not None:
                    log.warning(
                        "tunnel session dropped: connection lost", extra={"session_id": dropped}
                    )
            if self._stop.is_set():
                break
            self._next_url(conn)
            if (
                conn is not None
                and conn.welcome is not None
                and loop.time() - conn.opened_at >= s.backoff_reset_after_s
            ):
                backoff.reset()
            delay = self._reconnect_delay(conn, backoff)
            log.info("reconnecting", extra={"delay_s": round(delay, 3)})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    # -- one connection ---------------------------------------------------------------------

    async def _attempt(self) -> _Connection | None:
        """``_connect_once``, abandoned if ``stop()`` comes before the socket is open."""
        attempt = asyncio.create_task(self._connect_once(), name="agent-connect")
        stopping = asyncio.create_task(self._stop.wait(), name="agent-stop")
        try:
            await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            attempt.cancel()  # run() itself was cancelled: leave no orphan connection behind
            raise
        finally:
            stopping.cancel()
        if not attempt.done() and self.connection is None:
            # still connecting (up to open_timeout_s): nothing to close cleanly, give up now
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await attempt
            return None
        # an open connection sees stop() itself and closes with 1000 (bounded by close_timeout_s)
        return await attempt

    async def _connect_once(self) -> _Connection | None:
        """One attempt: connect, serve until the socket ends; ``None`` if it never opened."""
        s = self.settings
        try:
            credential = s.read_credential()
        except CredentialError as exc:
            log.warning("credential unavailable; will retry", extra={"error": str(exc)})
            return None
        try:
            async with connect(
                self.gateway_url,
                additional_headers={"Authorization": f"Bearer {credential}"},
                user_agent_header=f"gurutunnel-agent/{agent_version()}",
                open_timeout=s.open_timeout_s,
                ping_interval=s.ping_interval_s,
                ping_timeout=s.ping_timeout_s,
                close_timeout=s.close_timeout_s,
                max_size=s.max_frame_bytes,
            ) as ws:
                conn = _Connection(ws=ws, opened_at=asyncio.get_running_loop().time())
                self.connection = ws
                self.connections_made += 1
                log.info("connected to gateway", extra={"gateway_url": self.gateway_url})
                await self._serve(conn)
        except InvalidStatus as exc:
            if exc.response.status_code in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
                raise FatalRefusal(_refusal_reason(exc.response)) from None
            log.warning(
                "gateway refused the upgrade; will retry",
                extra={"http_status": exc.response.status_code, "gateway_url": self.gateway_url},
            )
            return None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            log.warning(
                "cannot connect to gateway; will retry",
                extra={
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                    "gateway_url": self.gateway_url,
                },
            )
            return None
        code = conn.close_code = ws.close_code
        log.info(
            "disconnected from gateway",
            extra={"close_code": code, "conn_id": conn.welcome.conn_id if conn.welcome else None},
        )
        if close_is_fatal(code) and not self._stop.is_set():
            assert code is not None  # close_is_fatal(None) is False
            raise FatalRefusal(_close_reason(code, ws.close_reason or ""))
        return conn

    async def _serve(self, conn: _Connection) -> None:
        """Run the reader until the socket ends, the welcome is late, or ``stop()``."""
        s = self.settings
        reader = asyncio.create_task(self._read_loop(conn), name="agent-reader")
        stopping = asyncio.create_task(self._stop.wait(), name="agent-stop")
        welcomed = asyncio.create_task(conn.welcomed.wait(), name="agent-welcome")
        try:
            done, _ = await asyncio.wait(
                {reader, stopping, welcomed},
                timeout=s.welcome_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                log.warning("no welcome from gateway in time; closing")
                await conn.ws.close(CloseCode.PROTOCOL_ERROR, "no welcome")
            elif reader not in done and stopping not in done:
                await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done() and not reader.done():
                await conn.ws.close(CloseCode.NORMAL, "agent shutting down")
            # closing above is bounded by close_timeout_s; the reader then sees the end
            try:
                async with asyncio.timeout(s.close_timeout_s + s.send_timeout_s):
                    await reader
            except TimeoutError:
                log.warning("connection did not end in time; aborting it")
                conn.ws.transport.abort()
        finally:
            for task in (reader, stopping, welcomed, conn.heartbeat):
                if task is not None and not task.done():
                    task.cancel()
            if conn.heartbeat is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await conn.heartbeat
            # the session cannot outlive its socket: kill what it started, send nothing more
            conn.alive = False
            for running in conn.channels.values():
                if isinstance(running.runtime, UploadChannel | DownloadChannel):
                    running.runtime.cancel("connection lost")
            try:
                await self._end_channels(conn, ExitReason.SESSION_CLOSED)
            except BaseException:
                for running in conn.channels.values():
                    running.runtime.kill_now()
                raise

    async def _read_loop(self, conn: _Connection) -> None:
        """The one reader of this connection: decode, dispatch, answer."""
        try:
            async for raw in conn.ws:
                try:
                    await self._on_frame(conn, raw)
                except ConnectionClosed:
                    raise
                except Exception:
                    # a bug in handling one frame must not take the connection down with it
                    log.exception("unexpected error while handling a frame; skipped")
        except ConnectionClosed:
            pass  # abnormal end (1006, reset, ping timeout); the close code is on the socket

    async def _on_frame(self, conn: _Connection, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            # protocol version 1 carries frames in text messages only (docs/protocol.md)
            log.warning("binary frame from gateway skipped", extra={"frame_bytes": len(raw)})
            return
        try:
            frame = decode_server_to_agent(raw, self.settings.max_frame_bytes)
        except ProtocolError as exc:
            # never the content: it may carry technician data
            log.warning(
                "malformed frame from gateway skipped",
                extra={"error_code": exc.code.value, "frame_bytes": len(raw)},
            )
            return
        if isinstance(frame, Welcome):
            self._on_welcome(conn, frame)
        elif isinstance(frame, ErrorFrame):
            log.warning(
                "gateway refused a frame",
                extra={
                    "error_code": frame.code.value,
                    "req_id": frame.req_id,
                    "error": frame.message[:200],
                },
            )
        elif isinstance(frame, Reconnect):
            # bounded here and again (with the backoff) in _reconnect_delay
            conn.reconnect_delay_s = min(frame.delay_ms / 1000, self.settings.backoff_max_s)
            log.info(
                "gateway asked to reconnect",
                extra={"delay_ms": frame.delay_ms, "reason": frame.reason},
            )
            await conn.ws.close(CloseCode.NORMAL, "reconnect requested")
        else:
            for item in self.tunnel.handle(frame):
                if isinstance(item, ACTION_TYPES):
                    await self._act(conn, item)
                else:
                    await self._send(conn, item)

    # -- channels ---------------------------------------------------------------------------

    async def _act(self, conn: _Connection, action: Action) -> None:
        match action:
            case StartCommand() | StartShell():
                frame = action.frame
                try:
                    if isinstance(action, StartCommand):
                        await self._start_command(conn, action)
                    else:
                        await self._start_shell(conn, action)
                except ConnectionClosed:
                    raise
                except Exception:
                    # a bug, not a refusal: free the slot and answer instead of going silent
                    log.exception("channel could not be started", extra={"type": frame.type})
                    running = conn.channels.get(frame.channel_id)
                    if running is None or running.token != action.token:
                        self.tunnel.release_channel(
                            frame.session_id, frame.channel_id, action.token
                        )
                        await self._send(
                            conn,
                            TunnelError(
                                req_id=frame.req_id,
                                session_id=frame.session_id,
                                channel_id=frame.channel_id,
                                code=ErrorCode.INTERNAL_ERROR,
                                error="the agent could not start the channel",
                            ),
                        )
            case StartUpload() | StartDownload():
                self._start_transfer(conn, action)
            case FileData():
                running = conn.channels.get(action.channel_id)
                if running is not None and isinstance(running.runtime, UploadChannel):
                    running.runtime.receive(action.frame)
            case FileAcked():
                running = conn.channels.get(action.channel_id)
                if running is not None and isinstance(running.runtime, DownloadChannel):
                    running.runtime.ack(action.offset)
            case OutputAcked():
                running = conn.channels.get(action.channel_id)
                if running is not None and isinstance(
                    running.runtime, CommandChannel | ShellChannel
                ):
                    running.runtime.output.window.ack(action.seq)
            case StopChannel():
                running = conn.channels.get(action.channel_id)
                if running is not None and running.session_id == action.session_id:
                    running.runtime.request_stop(action.reason)
                    if action.wait:
                        await self._await_channels(conn, [running], action.reason)
            case EndSession():
                await self._end_channels(conn, ExitReason.SESSION_CLOSED, action.session_id)
            case ShellInput():
                await self._shell_input(conn, action)
            case ResizeShell():
                running = conn.channels.get(action.channel_id)
                if running is not None and isinstance(running.runtime, ShellChannel):
                    running.runtime.resize(cols=action.cols, rows=action.rows)

    def _emitter(self, conn: _Connection) -> Emit:
        async def emit(frame: AgentToServer) -> None:
            if not conn.alive:
                return  # the socket (and so the session) is gone: nothing leaves for it
            try:
                await self._send(conn, frame)
            except ConnectionClosed:
                conn.alive = False

        return emit

    async def _open_cwd(self, requested: str | None) -> WorkDir:
        """The checked, opened working directory (worker thread, bounded), or CwdNotAllowed."""
        allowlist = list(self.settings.cwd_allowlist)
        future = asyncio.get_running_loop().run_in_executor(
            self._cwd_executor, open_cwd, requested, allowlist
        )
        await asyncio.wait({future}, timeout=self.settings.cwd_timeout_s)
        if not future.done():
            # the thread cannot be interrupted: close what it opens if it ever finishes
            future.add_done_callback(_close_late_workdir)
            raise CwdNotAllowed("checking the working directory timed out")
        return future.result()

    async def _refuse_start(
        self, conn: _Connection, action: StartCommand | StartShell, exc: TunnelStateError
    ) -> None:
        frame = action.frame
        self.tunnel.release_channel(frame.session_id, frame.channel_id, action.token)
        await self._send(
            conn,
            TunnelError(
                req_id=frame.req_id,
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                code=exc.code,
                error=exc.message,
            ),
        )

    async def _start_command(self, conn: _Connection, action: StartCommand) -> None:
        s, frame = self.settings, action.frame
        try:
            workdir = await self._open_cwd(frame.cwd)
        except CwdNotAllowed as exc:
            await self._refuse_start(conn, action, exc)
            return
        runtime = CommandChannel(
            frame,
            cwd=workdir,
            limits=CommandLimits(
                chunk_bytes=s.chunk_bytes,
                max_output_bytes=s.max_output_bytes,
                kill_grace_s=s.kill_grace_s,
                inline_result_bytes=s.inline_result_bytes
                if frame.inline_result and s.inline_result_window_s
                else 0,
            ),
            emit=self._emitter(conn),
        )
        pid = await runtime.start()

        async def answer() -> AgentToServer:
            # the command runs meanwhile (launched before): a short one ends in the answer
            # (held only when the request asked for it: settle() returns at once otherwise)
            output, exit_frame = await runtime.output.settle(s.inline_result_window_s)
            return TerminalStarted(
                req_id=frame.req_id,
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                pid=pid,
                output=output,
                exit=exit_frame,
                window_bytes=frame.window_bytes,
            )

        await self._announce(conn, action, runtime, answer, what="command", pid=pid)

    async def _start_shell(self, conn: _Connection, action: StartShell) -> None:
        s, frame = self.settings, action.frame
        try:
            workdir = await self._open_cwd(None)
        except CwdNotAllowed as exc:
            await self._refuse_start(conn, action, exc)
            return
        runtime = ShellChannel(
            frame,
            cwd=workdir,
            chunk_bytes=s.chunk_bytes,
            kill_grace_s=s.kill_grace_s,
            input_buffer_bytes=s.shell_input_buffer_bytes,
            emit=self._emitter(conn),
        )
        pid = await runtime.start()

        async def answer() -> AgentToServer:
            return ChannelOpened(
                req_id=frame.req_id,
                session_id=frame.session_id,
                channel_id=frame.channel_id,
                channel_type=ChannelType.SHELL,
                window_bytes=frame.window_bytes,
            )

        await self._announce(conn, action, runtime, answer, what="shell", pid=pid)

    async def _announce(
        self,
        conn: _Connection,
        action: StartCommand | StartShell,
        runtime: CommandChannel | ShellChannel,
        answer: Callable[[], Awaitable[AgentToServer]],
        *,
        what: str,
        pid: int | None,
    ) -> None:
        """Register a started channel, answer its request (built by ``answer`` once the channel
        runs), then let its output flow. An answer that waits for the channel's first output
        (an inline result) is sent by the channel's own task: the reader goes on meanwhile."""
        frame = action.frame

        async def answer_then_open() -> None:
            try:
                reply = await answer()
                try:
                    await self._send(conn, reply)
                except asyncio.CancelledError:
                    if isinstance(reply, TerminalStarted):
                        runtime.output.not_delivered(reply.exit)
                    raise
                except Exception:
                    # the answer did not leave: the frames it carried go on their own, first
                    await self._send_inline(conn, reply)
                    raise
            finally:
                # whatever happened to the answer, the channel must be able to end (exit frame)
                runtime.output.open()

        in_task = runtime.output.holding  # only a command asked for an inline result holds
        if in_task:
            runtime.output.answer_opens()
        # registered before the answer: if the socket dies while answering, the connection's
        # cleanup still finds (and kills) the process
        self._launch(conn, action, runtime, answer_then_open if in_task else None)
        log.info(
            f"{what} started",
            extra={"session_id": frame.session_id, "channel_id": frame.channel_id, "pid": pid},
        )
        if not in_task:
            await answer_then_open()

    async def _send_inline(self, conn: _Connection, reply: AgentToServer) -> None:
        """Best effort: the chunks and exit a failed ``terminal.started`` carried."""
        if not isinstance(reply, TerminalStarted):
            return
        try:
            for frame in reply.frames():
                await self._send(conn, frame)
        except Exception as exc:
            log.warning(
                "inline output undeliverable",
                extra={"channel_id": reply.channel_id, "error": type(exc).__name__},
            )

    def _start_transfer(self, conn: _Connection, action: StartUpload | StartDownload) -> None:
        """One task per transfer: ``serve()`` answers the request and ends the channel."""
        frame = action.frame
        runtime: FileRuntime
        if isinstance(action, StartUpload):
            runtime = UploadChannel(
                action.frame,
                self._emitter(conn),
                file_allowlist=self.settings.file_allowlist,
                limits=self._file_limits,
                executor=self._file_executor,
            )
        else:
            runtime = DownloadChannel(
                action.frame,
                self._emitter(conn),
                file_allowlist=self.settings.file_allowlist,
                limits=self._file_limits,
                executor=self._file_executor,
            )

        async def serve() -> None:
            try:
                await runtime.serve()
            finally:
                self.tunnel.release_channel(frame.session_id, frame.channel_id, action.token)

        task = asyncio.create_task(serve(), name=f"agent-file-{frame.channel_id}")
        running = _Running(frame.session_id, frame.channel_id, action.token, runtime, task)
        conn.channels[frame.channel_id] = running
        task.add_done_callback(lambda _: self._channel_done(conn, running))
        log.info(
            "file transfer started",
            extra={
                "session_id": frame.session_id,
                "channel_id": frame.channel_id,
                "type": frame.type,
            },
        )

    def _launch(
        self,
        conn: _Connection,
        action: StartCommand | StartShell,
        runtime: CommandChannel | ShellChannel,
        answer: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        frame = action.frame
        work = runtime.run() if answer is None else _run_answered(runtime, answer)
        task = asyncio.create_task(work, name=f"agent-channel-{frame.channel_id}")
        running = _Running(frame.session_id, frame.channel_id, action.token, runtime, task)
        conn.channels[frame.channel_id] = running
        task.add_done_callback(lambda _: self._channel_done(conn, running))

    def _channel_done(self, conn: _Connection, running: _Running) -> None:
        if conn.channels.get(running.channel_id) is running:
            del conn.channels[running.channel_id]
        # the id may be used again (a no-op if the session was closed meanwhile, or if the id
        # already belongs to a newer channel)
        self.tunnel.release_channel(running.session_id, running.channel_id, running.token)
        task = running.task
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            log.error(
                "channel failed",
                extra={"channel_id": running.channel_id},
                exc_info=(type(exc), exc, exc.__traceback__),
            )

    def _channel_end_bound_s(self) -> float:
        # kill (TERM, grace, KILL, grace), drain (grace), then the exit frame's send
        return 4 * self.settings.kill_grace_s + self.settings.send_timeout_s + 1.0

    async def _await_channels(
        self, conn: _Connection, runnings: list[_Running], reason: ExitReason
    ) -> None:
        """Wait (bounded) for channels to finish; stragglers are cancelled (SIGKILL) and their
        exit frames sent for them (best effort, ``reason`` unless they had one already)."""
        tasks = {r.task for r in runnings}
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._channel_end_bound_s())
        for task in pending:
            task.cancel()
        if pending:
            log.warning("channels did not end in time; killed", extra={"count": len(pending)})
            await asyncio.wait(pending, timeout=1.0)
        for running in runnings:
            if running.task in pending and not _has_ended(running.runtime):
                try:
                    async with asyncio.timeout(self.settings.send_timeout_s + 1.0):
                        await running.runtime.abandon(reason)
                except TimeoutError:
                    log.warning("exit frame of an abandoned channel not sent in time")
            # a task still running stays in the table (and is killed with the connection);
            # a done one was removed by its done callback
            if running.task.done() and conn.channels.get(running.channel_id) is running:
                del conn.channels[running.channel_id]

    async def _end_channels(
        self, conn: _Connection, reason: ExitReason, session_id: str | None = None
    ) -> None:
        """End every running channel (of ``session_id``, if given) with ``reason``."""
        runnings = [
            r for r in conn.channels.values() if session_id is None or r.session_id == session_id
        ]
        for running in runnings:
            running.runtime.request_stop(reason)
        await self._await_channels(conn, runnings, reason)

    async def _shell_input(self, conn: _Connection, action: ShellInput) -> None:
        running = conn.channels.get(action.channel_id)
        if running is None or not isinstance(running.runtime, ShellChannel):
            return  # registered but already ending: its exit frame is on the way
        if not running.runtime.feed(action.data):
            await self._send(
                conn,
                TunnelError(
                    session_id=action.session_id,
                    channel_id=action.channel_id,
                    code=ErrorCode.AGENT_BACKPRESSURE,
                    error="the shell is not reading its input; input dropped",
                ),
            )

    def _on_welcome(self, conn: _Connection, frame: Welcome) -> None:
        if conn.welcome is not None:
            log.warning("duplicate welcome ignored")
            return
        conn.welcome = frame
        interval = max(
            min(self.settings.heartbeat_interval_s, frame.heartbeat_interval_s),
            _MIN_HEARTBEAT_INTERVAL_S,
        )
        log.info(
            "welcomed by gateway",
            extra={
                "agent_id": frame.agent_id,
                "conn_id": frame.conn_id,
                "gateway_id": frame.gateway_id,
                "heartbeat_interval_s": interval,
            },
        )
        conn.heartbeat = asyncio.create_task(
            self._heartbeat_loop(conn, interval), name="agent-heartbeat"
        )
        conn.welcomed.set()

    async def _heartbeat_loop(self, conn: _Connection, interval_s: float) -> None:
        """A heartbeat at once, then every ``interval_s``, until the socket ends."""
        try:
            while True:
                metrics = await self._collect_metrics()
                await self._send(
                    conn,
                    Heartbeat(
                        sent_at=datetime.now(UTC),
                        mode=self.tunnel.mode.value,
                        session_id=self.tunnel.session_id,
                        metrics=metrics,
                    ),
                )
                await asyncio.sleep(interval_s)
        except ConnectionClosed:
            return

    async def _collect_metrics(self) -> HostMetrics:
        """Fresh metrics, else the last ones, else a minimal snapshot (beats never stop)."""
        inflight = self._metrics_inflight
        if inflight is None or inflight.done():
            inflight = asyncio.get_running_loop().run_in_executor(
                self._metrics_executor, self._metrics
            )
            inflight.add_done_callback(self._metrics_done)
            self._metrics_inflight = inflight
            wait = True
        else:
            # the previous collection still hangs: do not delay this beat for it again,
            # unless there is nothing at all to send yet
            log.warning("host metrics still pending; reusing the last ones")
            wait = self.last_metrics is None
        if wait:
            # asyncio.wait neither cancels the future nor raises; the callback records it
            await asyncio.wait({inflight}, timeout=self.settings.metrics_timeout_s)
            if not inflight.done():
                log.warning("host metrics timed out; reusing the last ones")
        if self.last_metrics is not None:
            return self.last_metrics
        return minimal_host_metrics()

    def _metrics_done(self, future: asyncio.Future[HostMetrics]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.error(
                "host metrics failed; reusing the last ones",
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            return
        self.last_metrics = future.result()

    async def _send(self, conn: _Connection, frame: AgentToServer) -> None:
        """The one way out: serialized, in order, bounded by ``send_timeout_s``."""
        async with conn.send_lock:
            try:
                async with asyncio.timeout(self.settings.send_timeout_s):
                    await conn.ws.send(encode_text(frame))
            except TimeoutError:
                log.warning("gateway stopped reading; aborting the connection")
                conn.ws.transport.abort()
                raise ConnectionClosed(None, None) from None


def _close_late_workdir(future: asyncio.Future[WorkDir]) -> None:
    """Close the directory a timed-out check opened after all."""
    if not future.cancelled() and future.exception() is None:
        future.result().close()
