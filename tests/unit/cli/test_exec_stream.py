"""``gurutunnel exec`` over the NDJSON stream, against httpx.MockTransport."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gurutunnel_cli.client import ApiClient
from gurutunnel_cli.errors import ApiError, CliError
from gurutunnel_cli.remote_exec import CancelledBeforeExit, ExecRequest, ExecRunner


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


def _chunk(seq: int, stream: str, data: bytes) -> dict[str, Any]:
    return {"event": "chunk", "seq": seq, "stream": stream, "data": base64.b64encode(data).decode()}


def _exit(seq: int, reason: str = "exited", code: int | None = 0, **extra: Any) -> dict[str, Any]:
    return {
        "event": "exit",
        "seq": seq,
        "reason": reason,
        "exit_code": code,
        "truncated": False,
        "duration_s": 0.1,
        "stdout_bytes": 0,
        "stderr_bytes": 0,
        "error": None,
        **extra,
    }


STARTED = {"event": "started", "channel_id": "c1", "pid": 42}


class Harness:
    """A runner wired to a MockTransport that streams the given events."""

    def __init__(self, events: list[dict[str, Any]] | None = None) -> None:
        self.events = events or []
        self.requests: list[httpx.Request] = []
        self.out = io.BytesIO()
        self.err = io.BytesIO()
        self.client = ApiClient(
            "http://api.test", "tok", transport=httpx.MockTransport(self.handle)
        )
        self.runner = ExecRunner(self.client, "s1", self.out, self.err, cancel_wait_s=0.5)

    async def body(self) -> AsyncIterator[bytes]:
        for event in self.events:
            yield _line(event)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(
            200, headers={"Content-Type": "application/x-ndjson"}, content=self.body()
        )

    async def run(self, request: ExecRequest | None = None) -> int:
        async with self.client:
            return await self.runner.run(request or ExecRequest(argv=["ls", "-l"]))


async def test_chunks_go_to_their_own_fd_byte_exact_and_exit_code_is_returned() -> None:
    """stdout/stderr chunks land on the right stream byte for byte; the exit code comes back."""
    binary = bytes(range(256))
    h = Harness(
        [
            STARTED,
            _chunk(0, "stdout", b"out\n"),
            _chunk(1, "stderr", b"err\n"),
            _chunk(2, "stdout", binary),
            _exit(3, code=3),
        ]
    )
    assert await h.run(ExecRequest(argv=["sh", "-c", "x"], cwd="/tmp", timeout_s=5)) == 3
    assert h.out.getvalue() == b"out\n" + binary
    assert h.err.getvalue() == b"err\n"
    (req,) = h.requests
    assert req.url.path == "/api/v1/tunnel/s1/exec" and req.url.params["stream"] == "true"
    assert req.headers["accept"] == "application/x-ndjson"
    assert json.loads(req.content) == {"argv": ["sh", "-c", "x"], "cwd": "/tmp", "timeout_s": 5}
    assert h.runner.channel_id == "c1"


async def test_sh_sends_command_not_argv() -> None:
    """--sh sends {"command": ...} and no argv."""
    h = Harness([STARTED, _exit(0)])
    assert await h.run(ExecRequest(command="echo hi | wc -c")) == 0
    assert json.loads(h.requests[0].content) == {"command": "echo hi | wc -c"}


async def test_gap_event_is_reported_on_stderr_between_the_chunks() -> None:
    """A gap of frames 1..3 prints '[gurutunnel: 3 output frames lost]' and output goes on."""
    h = Harness(
        [
            STARTED,
            _chunk(0, "stdout", b"a"),
            {"event": "gap", "from_seq": 1, "to_seq": 3},
            _chunk(4, "stdout", b"b"),
            _exit(5),
        ]
    )
    assert await h.run() == 0
    assert h.out.getvalue() == b"ab"
    assert h.err.getvalue() == b"[gurutunnel: 3 output frames lost]\n"


async def test_unannounced_seq_jump_is_reported_as_a_gap() -> None:
    """A chunk whose seq skips ahead without a gap event is still reported, never joined."""
    h = Harness([STARTED, _chunk(0, "stdout", b"a"), _chunk(3, "stderr", b"b"), _exit(4)])
    assert await h.run() == 0
    assert h.err.getvalue() == b"[gurutunnel: 2 output frames lost]\nb"


@pytest.mark.parametrize(
    ("reason", "code", "expected", "said"),
    [
        ("timeout", None, 124, b"timeout"),
        ("spawn_failed", None, 127, b"spawn_failed: no such file"),
        ("session_closed", None, 255, b"session_closed"),
        ("exited", -9, 137, b""),
    ],
)
async def test_exit_reason_becomes_exit_code_with_a_notice(
    reason: str, code: int | None, expected: int, said: bytes
) -> None:
    """timeout/spawn_failed/session_closed/signal exits map to 124/127/255/128+N."""
    h = Harness([STARTED, _exit(0, reason, code, error="no such file")])
    assert await h.run() == expected
    assert said in h.err.getvalue()


async def test_truncated_output_is_flagged() -> None:
    """An exit frame with truncated=true prints a truncation notice on stderr."""
    h = Harness([STARTED, _chunk(0, "stdout", b"x"), _exit(1, truncated=True)])
    assert await h.run() == 0
    assert b"truncated" in h.err.getvalue()


async def test_error_event_raises_its_code() -> None:
    """An {"event": "error"} line (the API lost the command) raises CliError with its code."""
    h = Harness([STARTED, {"event": "error", "code": "agent_offline", "message": "agent left"}])
    with pytest.raises(CliError) as info:
        await h.run()
    assert info.value.render() == "gurutunnel: agent_offline: agent left"


async def test_stream_that_ends_without_exit_is_an_error() -> None:
    """A stream cut before the exit frame raises stream_ended instead of exiting 0."""
    h = Harness([STARTED, _chunk(0, "stdout", b"partial")])
    with pytest.raises(CliError) as info:
        await h.run()
    assert info.value.code == "stream_ended"
    assert h.out.getvalue() == b"partial"


async def test_unknown_event_kind_is_skipped() -> None:
    """A newer API's unknown event kind does not break the stream."""
    h = Harness([STARTED, {"event": "progress", "x": 1}, _exit(0)])
    assert await h.run() == 0


async def test_refusal_before_the_stream_raises_api_error() -> None:
    """A 409 agent_offline before anything runs raises ApiError with the API's code."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"error": {"code": "agent_offline", "message": "off"}})

    client = ApiClient("http://api.test", "tok", transport=httpx.MockTransport(handler))
    async with client:
        runner = ExecRunner(client, "s1", io.BytesIO(), io.BytesIO())
        with pytest.raises(ApiError) as info:
            await runner.run(ExecRequest(argv=["true"]))
    assert (info.value.status, info.value.code) == (409, "agent_offline")


class CancellableHarness(Harness):
    """Streams `started`, then waits for the cancel POST before sending the exit frame."""

    def __init__(self, answer_cancel: bool = True) -> None:
        super().__init__()
        self.cancelled = asyncio.Event()
        self.answer_cancel = answer_cancel

    async def body(self) -> AsyncIterator[bytes]:
        yield _line(STARTED)
        yield _line(_chunk(0, "stdout", b"working\n"))
        await self.cancelled.wait()
        if self.answer_cancel:
            yield _line(_exit(1, "cancelled", None))
        else:
            await asyncio.Event().wait()  # an API that never sends the exit frame

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/cancel"):
            self.requests.append(request)
            self.cancelled.set()
            return httpx.Response(202, json={"channel_id": "c1"})
        return await super().handle(request)


async def test_ctrl_c_posts_cancel_and_waits_for_the_cancelled_exit_frame() -> None:
    """request_cancel POSTs .../exec/c1/cancel and the cancelled exit frame gives 130."""
    h = CancellableHarness()
    async with h.client:
        task = asyncio.create_task(h.runner.run(ExecRequest(argv=["sleep", "100"])))
        await asyncio.wait_for(h.runner.started.wait(), 5)
        h.runner.request_cancel()
        assert await asyncio.wait_for(task, 5) == 130
    assert [r.url.path for r in h.requests] == [
        "/api/v1/tunnel/s1/exec",
        "/api/v1/tunnel/s1/exec/c1/cancel",
    ]
    assert h.out.getvalue() == b"working\n"


async def test_ctrl_c_gives_up_after_the_cancel_wait_with_130() -> None:
    """No exit frame within cancel_wait_s after the cancel: CancelledBeforeExit (exit 130)."""
    h = CancellableHarness(answer_cancel=False)
    async with h.client:
        task = asyncio.create_task(h.runner.run(ExecRequest(argv=["sleep", "100"])))
        await asyncio.wait_for(h.runner.started.wait(), 5)
        h.runner.request_cancel()
        with pytest.raises(CancelledBeforeExit) as info:
            await asyncio.wait_for(task, 5)
    assert info.value.exit_code == 130


async def test_second_ctrl_c_drops_the_stream_at_once() -> None:
    """A second request_cancel does not wait for the exit frame."""
    h = CancellableHarness(answer_cancel=False)
    h.runner.cancel_wait_s = 60
    async with h.client:
        task = asyncio.create_task(h.runner.run(ExecRequest(argv=["sleep", "100"])))
        await asyncio.wait_for(h.runner.started.wait(), 5)
        h.runner.request_cancel()
        await asyncio.wait_for(h.cancelled.wait(), 5)
        h.runner.request_cancel()
        with pytest.raises(CancelledBeforeExit):
            await asyncio.wait_for(task, 5)
