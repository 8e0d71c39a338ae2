"""``gurutunnel exec``: run one command in a session through the API's NDJSON stream.

Contract:
- Each ``chunk`` goes, as raw bytes, to ``out`` (stdout) or ``err`` (stderr) as it arrives, and
  is flushed at once. A ``gap`` event (or a jump in ``seq`` the API did not announce) prints
  ``[gurutunnel: N output frames lost]`` on ``err``; output is never silently joined.
- The result is the CLI exit code for the ``exit`` event (``errors.exit_code_for``). An ``error``
  event, or a stream that ends without ``exit``, raises ``CliError`` (exit 1).
- ``request_cancel`` (Ctrl-C) posts ``.../exec/<channel>/cancel`` and keeps reading for the exit
  frame for at most ``cancel_wait_s``; a second request, or Ctrl-C before the command started,
  drops the stream at once (the API cancels a command whose client went away) and gives 130.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, BinaryIO

from gurutunnel_protocol.messages.terminal import ExitReason, OutputStream

from .client import ApiClient
from .errors import EXIT_CANCELLED, CliError, exit_code_for
from .wire import (
    StreamChunk,
    StreamError,
    StreamExit,
    StreamGap,
    StreamStarted,
    decode_stream_line,
    gap_notice,
)

DEFAULT_COMMAND_TIMEOUT_S = 300.0
CANCEL_WAIT_S = 10.0


@dataclass(frozen=True)
class ExecRequest:
    """Exactly one of ``argv`` (no shell) and ``command`` (the agent's shell)."""

    argv: list[str] | None = None
    command: str | None = None
    cwd: str | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.command is None):
            raise CliError("usage", "give either -- ARGV... or --sh COMMAND (exactly one)")
        if self.argv is not None and not self.argv:
            raise CliError("usage", "ARGV is empty")

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"argv": self.argv} if self.argv is not None else {}
        if self.command is not None:
            body["command"] = self.command
        if self.cwd is not None:
            body["cwd"] = self.cwd
        if self.timeout_s is not None:
            body["timeout_s"] = self.timeout_s
        return body


class CancelledBeforeExit(CliError):
    """Ctrl-C and no exit frame to wait for (not started yet, second Ctrl-C, wait ran out)."""

    exit_code = EXIT_CANCELLED


class ExecRunner:
    """Runs one command and copies its output; see the module docstring."""

    def __init__(
        self,
        client: ApiClient,
        session_id: str,
        out: BinaryIO,
        err: BinaryIO,
        *,
        cancel_wait_s: float = CANCEL_WAIT_S,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.out = out
        self.err = err
        self.cancel_wait_s = cancel_wait_s
        self.channel_id: str | None = None
        self.started = asyncio.Event()
        self._cancel_requests = 0
        self._task: asyncio.Task[Any] | None = None
        self._deadline: asyncio.Timeout | None = None
        self._cancel_post: asyncio.Task[None] | None = None

    def _notice(self, text: str) -> None:
        self.err.write(f"{text}\n".encode())
        self.err.flush()

    async def run(self, request: ExecRequest) -> int:
        """Run ``request`` to its end; returns the CLI exit code."""
        self._task = asyncio.current_task()
        timeout_s = request.timeout_s or DEFAULT_COMMAND_TIMEOUT_S
        try:
            async with asyncio.timeout(None) as deadline:
                self._deadline = deadline
                async with self.client.exec_stream(
                    self.session_id, request.body(), command_timeout_s=timeout_s
                ) as lines:
                    return await self._consume(lines)
        except TimeoutError as exc:
            # only the cancel deadline is ever set on this timeout
            raise CancelledBeforeExit(
                ExitReason.CANCELLED.value,
                f"no exit frame within {self.cancel_wait_s:g}s after cancel; stream dropped",
            ) from exc
        except asyncio.CancelledError:
            if self._cancel_requests:
                raise CancelledBeforeExit(
                    ExitReason.CANCELLED.value, "interrupted; the stream was dropped"
                ) from None
            raise

    async def _consume(self, lines: Any) -> int:
        expected_seq = 0
        async for line in lines:
            try:
                event = decode_stream_line(line)
            except ValueError as exc:
                raise CliError(
                    "bad_response", f"malformed stream line from the API: {exc}"
                ) from exc
            if isinstance(event, StreamStarted):
                self.channel_id = event.channel_id
                self.started.set()
            elif isinstance(event, StreamChunk):
                if event.seq > expected_seq:
                    self._notice(gap_notice(expected_seq, event.seq - 1))
                expected_seq = max(expected_seq, event.seq + 1)
                target = self.out if event.stream == OutputStream.STDOUT else self.err
                target.write(event.data)
                target.flush()
            elif isinstance(event, StreamGap):
                self._notice(gap_notice(event.from_seq, event.to_seq))
                expected_seq = max(expected_seq, event.to_seq + 1)
            elif isinstance(event, StreamExit):
                return self._finish(event)
            elif isinstance(event, StreamError):
                raise CliError(event.code, event.message)
        raise CliError("stream_ended", "the API's stream ended before the command's exit frame")

    def _finish(self, event: StreamExit) -> int:
        if event.truncated:
            self._notice("[gurutunnel: output truncated by the output cap]")
        if event.reason == ExitReason.SPAWN_FAILED:
            self._notice(f"gurutunnel: spawn_failed: {event.error or 'the command did not start'}")
        elif event.reason == ExitReason.TIMEOUT:
            self._notice("gurutunnel: timeout: the command ran past its timeout and was killed")
        elif event.reason == ExitReason.SESSION_CLOSED:
            self._notice("gurutunnel: session_closed: the session closed while the command ran")
        elif event.reason == ExitReason.CANCELLED:
            self._notice("gurutunnel: cancelled")
        return exit_code_for(event.reason, event.exit_code)

    def request_cancel(self) -> None:
        """Ctrl-C: cancel the remote command (first time) or drop the stream (second time)."""
        self._cancel_requests += 1
        if self._cancel_requests == 1 and self.channel_id is not None:
            self._post_cancel()
            if self._deadline is not None:
                loop = asyncio.get_running_loop()
                self._deadline.reschedule(loop.time() + self.cancel_wait_s)
            return
        if self._task is not None:
            self._task.cancel()

    def _post_cancel(self) -> None:
        assert self.channel_id is not None
        self._notice("[gurutunnel: cancelling the remote command]")
        self._cancel_post = asyncio.create_task(self._cancel(self.channel_id))

    async def _cancel(self, channel_id: str) -> None:
        try:
            await self.client.cancel_exec(self.session_id, channel_id)
        except CliError as exc:
            # the command may have ended meanwhile (404); its exit frame still decides
            self._notice(f"gurutunnel: cancel: {exc.code}: {exc.message}")
