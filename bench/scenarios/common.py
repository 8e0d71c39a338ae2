"""Helpers the scenarios share: timed calls in interleaved blocks, exit waiters, stream readers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gurutunnel_api.config import ApiSettings
from gurutunnel_protocol import new_id
from gurutunnel_protocol.envelope import decode_command_result, encode
from gurutunnel_protocol.messages import CommandReply, Terminal, TerminalStarted

from ..baseline import DATA, END
from ..harness import Bench

OUTPUT_WINDOW_BYTES: int = ApiSettings.model_fields["output_window_bytes"].default
"""The ``window_bytes`` the API sends with every command (its default)."""

Timed = Callable[[int], Awaitable[float]]
"""One measured call (its index): returns its latency in seconds."""


async def bridge_rest_call(bench: Bench, name: str, verb: bytes, answer: bytes) -> float:
    """One POST to the bridge's bare ASGI app (NATS request to its peer): its latency in s."""
    t0 = time.perf_counter()
    r = await bench.api.post(bench.bridge_http_url(name), content=verb)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200 or r.content != answer:
        raise RuntimeError(f"bridge {verb.decode()} failed: {r.status_code} {r.text[:100]}")
    return elapsed


async def interleaved(
    sides: dict[str, Timed], counts: dict[str, int], block: int, warmup: int
) -> dict[str, list[float]]:
    """Run each side's calls in turn, ``block`` at a time, until each made ``counts[side]``.

    The first ``warmup`` calls of each side are run first and not kept. Latencies in ms."""
    for timed in sides.values():
        for i in range(warmup):
            await timed(i)
    out: dict[str, list[float]] = {name: [] for name in sides}
    done = False
    while not done:
        done = True
        for name, timed in sides.items():
            kept = out[name]
            for _ in range(min(block, counts[name] - len(kept))):
                kept.append(await timed(warmup + len(kept)) * 1000)
            done = done and len(kept) >= counts[name]
    return out


class ExitWaiter:
    """Futures resolved by the ``terminal.exit`` frame of a session on ``session.<id>.up``
    (for a command whose exit did not come in its answer).

    One command in flight per session at a time (the scenarios keep it so)."""

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[None]] = {}
        self.sub: Any = None

    async def start(self, bench: Bench) -> None:
        subjects = bench.subjects

        async def on_up(msg: Any) -> None:
            session_id = subjects.up_session_id(msg.subject)
            # a byte test, not a decode: this harness must not add its own CPU to the timing
            if session_id is not None and b'"terminal.exit"' in msg.data:
                future = self.pending.pop(session_id, None)
                if future is not None and not future.done():
                    future.set_result(None)

        self.sub = await bench.nc.subscribe(bench.subjects.all_sessions(), cb=on_up)
        await bench.nc.flush()

    def expect(self, session_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending[session_id] = future
        return future

    def forget(self, session_id: str) -> None:
        """The exit came in the answer: no frame on ``session.<id>.up`` resolves this one."""
        future = self.pending.pop(session_id, None)
        if future is not None:
            future.cancel()

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()


async def bus_command(
    bench: Bench, waiter: ExitWaiter, agent_id: str, session_id: str, timeout_s: float = 10
) -> float:
    """``bench echo`` as the API sends it on the bus: seconds from the request until the exit
    frame was received (in the answer, for a command that ends within the agent's inline
    window; else on the session's up subject)."""
    frame = Terminal(
        req_id=new_id(),
        session_id=session_id,
        channel_id=new_id(),
        command="bench echo",
        timeout_s=30,
        inline_result=True,
        window_bytes=OUTPUT_WINDOW_BYTES,
    )
    payload = encode(frame)
    subject = bench.subjects.agent_commands(agent_id)
    exited = waiter.expect(session_id)
    t0 = time.perf_counter()
    msg = await bench.nc.request(subject, payload, timeout=timeout_s)
    t1 = time.perf_counter()
    answer = decode_command_result(msg.data)
    if not isinstance(answer, CommandReply) or not isinstance(answer.frame, TerminalStarted):
        raise RuntimeError(f"unexpected answer to terminal.command: {answer.type}")
    if answer.frame.exit is not None:
        # a short command ends in its answer (terminal.started.exit): nothing else to wait for
        waiter.forget(session_id)
        return t1 - t0
    await asyncio.wait_for(exited, timeout_s)
    return time.perf_counter() - t0


def echo_command_bytes(req_id: str, session_id: str, channel_id: str) -> bytes:
    """``bench echo`` as the API encodes it (``encode(Terminal(...))``, checked by tests/bench),
    built by hand: the load generator of scenario 2 must not spend more per call than the
    bridge's, or it throttles the gateway it measures on a machine of few cores."""
    return (
        f'{{"v":1,"type":"terminal.command","req_id":"{req_id}","session_id":"{session_id}",'
        f'"channel_id":"{channel_id}","command":"bench echo","argv":null,"cwd":null,'
        '"timeout_s":30.0,"max_output_bytes":null,"inline_result":true,'
        f'"window_bytes":{OUTPUT_WINDOW_BYTES}}}'
    ).encode()


_lean_ids = itertools.count(1)


def lean_id() -> str:
    """A fresh id of the ``new_id`` shape (32 hex characters), from a counter: unique within
    the run, which is all a ``req_id`` or ``channel_id`` needs, without a ``getrandom`` call
    and a UUID object per id."""
    return f"{next(_lean_ids):032x}"


async def lean_bus_command(
    bench: Bench, waiter: ExitWaiter, subject: str, session_id: str, timeout_s: float = 10
) -> None:
    """:func:`bus_command` for the throughput loop, to the agent's command ``subject`` (built
    once per worker, as the bridge's): the answer is checked by its bytes (its ``req_id`` and
    an inline ``terminal.exit``), not decoded; scenario 1 decodes every one."""
    req_id = lean_id()
    payload = echo_command_bytes(req_id, session_id, lean_id())
    exited = waiter.expect(session_id)
    msg = await bench.nc.request(subject, payload, timeout_s)
    data: bytes = msg.data
    if b'"terminal.started"' not in data or req_id.encode() not in data:
        raise RuntimeError(f"unexpected answer to terminal.command: {data[:200]!r}")
    if b'"terminal.exit"' in data:
        waiter.forget(session_id)
        return
    await asyncio.wait_for(exited, timeout_s)


def b64_len(text: str) -> int:
    """Decoded length of a padded base64 string, without decoding it."""
    return len(text) * 3 // 4 - (2 if text.endswith("==") else 1 if text.endswith("=") else 0)


@dataclass
class StreamRun:
    """One stream as its reader saw it."""

    received: int = 0
    gaps: int = 0
    started_at: float = 0.0
    ended_at: float = 0.0
    first_byte_at: float = 0.0
    last_byte_at: float = 0.0
    error: str | None = None
    marks: list[tuple[float, int]] = field(default_factory=list)
    """(time, bytes received by then), at most every ``MARK_INTERVAL_S``: shares at a moment."""

    incomplete: bool = False
    """The stream stopped short: no message for ``STREAM_IDLE_S`` (a lost end frame)."""

    @property
    def seconds(self) -> float:
        return self.ended_at - self.started_at

    @property
    def mb_per_s(self) -> float:
        return self.received / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def mark(self, now: float) -> None:
        if not self.marks or now - self.marks[-1][0] >= MARK_INTERVAL_S:
            self.marks.append((now, self.received))

    def received_at(self, moment: float) -> float:
        """Bytes received by ``moment``: interpolated between the marks around it (the last
        byte is the last mark), so no stream's share is up to a mark interval stale."""
        if moment >= min(self.ended_at, self.last_byte_at or self.ended_at):
            return float(self.received)
        before, after = (0.0, 0), None
        marks = list(self.marks)
        if not marks or self.last_byte_at > marks[-1][0]:
            marks.append((self.last_byte_at, self.received))
        for mark in marks:
            if mark[0] <= moment:
                before = mark
            else:
                after = mark
                break
        if after is None or after[0] <= before[0]:
            return float(before[1])
        share = (moment - before[0]) / (after[0] - before[0])
        return before[1] + share * (after[1] - before[1])


MARK_INTERVAL_S = 0.01


STREAM_IDLE_S = 10.0
"""A reader that got nothing for this long gives up (the naive bridge may lose its end frame:
NATS cuts a slow consumer off) and reports what it received, flagged ``incomplete``."""


@contextlib.asynccontextmanager
async def _watchdog(ws: ClientConnection, run: StreamRun) -> AsyncIterator[None]:
    """Abort ``ws`` when ``run`` made no progress for ``STREAM_IDLE_S``."""

    async def watch() -> None:
        last = -1
        quiet_since = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            if run.received != last:
                last, quiet_since = run.received, time.monotonic()
            elif time.monotonic() - quiet_since > STREAM_IDLE_S:
                run.incomplete = True
                ws.transport.abort()
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


@dataclass
class StartGate:
    """Holds concurrent streams until every one of them is connected, then starts them
    together (a fixed sleep let sockets still connecting on a busy API start late, which
    counted their setup against their rate)."""

    expected: int
    go: asyncio.Event = field(default_factory=asyncio.Event)
    connected: int = 0
    all_connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self) -> None:
        """Called by a stream once its socket is open: returns at the start."""
        self.connected += 1
        if self.connected >= self.expected:
            self.all_connected.set()
        await self.go.wait()


async def gurutunnel_stream(
    bench: Bench,
    session_id: str,
    total: int,
    chunk: int,
    *,
    go: StartGate | None = None,
    timeout_s: float = 300,
) -> StreamRun:
    """Run ``bench stream`` over the API's technician WebSocket and read everything."""
    run = StreamRun()
    ticket = await bench.ticket(session_id)
    async with connect(bench.tech_ws_url(session_id, ticket), max_size=4 << 20) as ws:
        if go is not None:
            await go.wait()
        run.started_at = time.perf_counter()
        await ws.send(
            json.dumps(
                {"type": "exec", "command": f"bench stream {total} {chunk}", "timeout_s": 3600}
            )
        )
        try:
            async with asyncio.timeout(timeout_s), _watchdog(ws, run):
                async for raw in ws:
                    run.last_byte_at = time.perf_counter()
                    message = json.loads(raw)
                    kind = message.get("type")
                    if kind == "chunk":
                        if not run.received:
                            run.first_byte_at = time.perf_counter()
                        run.received += b64_len(message["data"])
                        run.mark(run.last_byte_at)
                    elif kind == "gap":
                        run.gaps += message["to_seq"] - message["from_seq"] + 1
                    elif kind == "exit":
                        break
                    elif kind == "error":
                        run.error = f"{message.get('code')}: {message.get('message')}"
                        break
        except ConnectionClosed:
            if not run.incomplete:
                raise
        run.ended_at = run.last_byte_at if run.incomplete else time.perf_counter()
    return run


async def bridge_stream(
    bench: Bench,
    name: str,
    total: int,
    chunk: int,
    *,
    go: StartGate | None = None,
    timeout_s: float = 300,
) -> StreamRun:
    """The same through the naive bridge: its API's WebSocket, binary frames."""
    run = StreamRun()
    async with connect(bench.bridge_ws_url(name), max_size=4 << 20) as ws:
        if go is not None:
            await go.wait()
        run.started_at = time.perf_counter()
        await ws.send(f"stream {total} {chunk}")
        try:
            async with asyncio.timeout(timeout_s), _watchdog(ws, run):
                async for raw in ws:
                    run.last_byte_at = time.perf_counter()
                    data = raw if isinstance(raw, bytes) else raw.encode()
                    if data[:1] == bytes([DATA]):
                        if not run.received:
                            run.first_byte_at = time.perf_counter()
                        run.received += len(data) - 1
                        run.mark(run.last_byte_at)
                    elif data[:1] == bytes([END]):
                        break
        except ConnectionClosed:
            if not run.incomplete:
                raise
        run.ended_at = run.last_byte_at if run.incomplete else time.perf_counter()
    return run


def mib(value: float) -> float:
    return value / (1024 * 1024)
