"""One command on a terminal channel: spawn, stream stdout/stderr, always one exit frame.

Contract (the wire side is in ``gurutunnel_protocol.messages.terminal``):
- ``argv`` is executed directly (no shell: its items reach the program unchanged); ``command``
  goes through the platform shell (POSIX ``/bin/sh -c``, Windows ``%COMSPEC% /c``), so a shell
  reports an unknown command as a normal exit 127 while an unknown ``argv[0]`` is
  ``spawn_failed``.
- The process leads a new session / process group; timeout, cancel and session close kill the
  whole group (:func:`~gurutunnel_agent.channels.process.kill_tree`). stdin is the null device.
- stdout and stderr are read concurrently in pieces of at most ``chunk_bytes`` and sent as
  ``terminal.chunk``; the reader awaits each send (back-pressure to the pipe, no unbounded
  buffer). Output beyond the cap (:class:`OutputBudget`) is read and dropped, and the exit frame
  says ``truncated``; ``stdout_bytes``/``stderr_bytes`` count everything the process wrote.
- When the process exits by itself, its output may drain for ``kill_grace_s`` more; a leftover
  child still holding the pipes after that is killed with its group (the exit stays ``exited``).
- The channel ends with exactly one ``terminal.exit`` whatever happens (``exited`` with the exit
  code, negative for a signal; ``timeout``; ``cancelled``; ``session_closed``; ``spawn_failed``
  with the reason), unless its task is cancelled outright, in which case the tree is SIGKILLed.
- :func:`resolve_cwd` is the working-directory policy: the real path (symlinks resolved) of an
  existing directory inside the real path of an allowlist root; anything else raises
  :class:`~gurutunnel_agent.tunnel.CwdNotAllowed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gurutunnel_protocol.messages import ExitReason, OutputStream, Terminal

from ..tunnel import CwdNotAllowed
from .output import ChannelOutput, Emit
from .process import kill_tree, kill_tree_now


def resolve_cwd(cwd: str | None, allowlist: Sequence[Path]) -> Path:
    """The real working directory for ``cwd`` (``None``: the first root), or CwdNotAllowed."""
    if not allowlist:
        raise CwdNotAllowed("no working directory is allowed on this agent")
    if cwd is None:
        cwd = str(allowlist[0])
    path = Path(cwd)
    if not path.is_absolute():
        raise CwdNotAllowed("the working directory must be an absolute path")
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        # missing, unreadable, a symlink loop, or a NUL byte: the same answer for all
        raise CwdNotAllowed("the working directory does not exist or cannot be read") from None
    if not real.is_dir():
        raise CwdNotAllowed("the working directory is not a directory")
    for root in allowlist:
        try:
            root_real = root.resolve(strict=False)
        except (OSError, RuntimeError):
            continue
        if real.is_relative_to(root_real):
            return real
    raise CwdNotAllowed("the working directory is outside the agent's allowlist")


class OutputBudget:
    """Output accounting of one command: what was produced, what may still be delivered."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self.delivered_bytes = 0
        self.produced: dict[OutputStream, int] = {s: 0 for s in OutputStream}
        self.truncated = False

    def take(self, stream: OutputStream, data: bytes) -> bytes:
        """Count ``data`` as produced; return the part that fits under the cap (maybe empty)."""
        self.produced[stream] += len(data)
        room = self.cap_bytes - self.delivered_bytes
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        self.delivered_bytes += len(data)
        return data


def spawn_error_text(exc: BaseException, program: str) -> str:
    """A short reason for a failed spawn (never a stack trace)."""
    name = program[:200]
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {name}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {name}"
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOEXEC:
            return f"not an executable: {name}"
        return f"cannot start {name}: {exc.strerror or type(exc).__name__}"
    return f"cannot start {name}: {exc}"[:1024]


def exit_outcome(
    stop_reason: ExitReason | None, returncode: int | None
) -> tuple[ExitReason, int | None]:
    """The exit reason and code of a process that was started.

    ``stop_reason`` is why the agent killed it (``timeout``, ``cancelled``, ``session_closed``),
    or ``None`` if it ended by itself: then ``exited`` with the return code, negative when a
    signal killed it (asyncio's convention on POSIX).
    """
    if stop_reason is None:
        return ExitReason.EXITED, returncode
    if stop_reason in (ExitReason.EXITED, ExitReason.SPAWN_FAILED):
        raise ValueError(f"{stop_reason} is not a reason to kill a process")
    return stop_reason, returncode


def platform_argv(frame: Terminal) -> list[str]:
    """The argv that runs ``frame``: its own ``argv``, or the platform shell with ``command``."""
    if frame.argv is not None:
        return list(frame.argv)
    assert frame.command is not None  # exactly one of them, checked by the model
    if sys.platform == "win32":
        return [os.environ.get("COMSPEC", "cmd.exe"), "/c", frame.command]
    return ["/bin/sh", "-c", frame.command]


def _group_kwargs() -> dict[str, Any]:
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


@dataclass(frozen=True)
class CommandLimits:
    chunk_bytes: int
    max_output_bytes: int
    kill_grace_s: float


class CommandChannel:
    """Run one ``terminal.command`` (see module docstring)."""

    def __init__(self, frame: Terminal, *, cwd: Path, limits: CommandLimits, emit: Emit) -> None:
        self.frame = frame
        self.cwd = cwd
        self.limits = limits
        self.output = ChannelOutput(frame.session_id, frame.channel_id, emit)
        cap = limits.max_output_bytes
        if frame.max_output_bytes is not None:
            cap = min(cap, frame.max_output_bytes)
        self.budget = OutputBudget(cap)
        self._proc: asyncio.subprocess.Process | None = None
        self._spawn_error: str | None = None
        self._stop = asyncio.Event()
        self._stop_reason: ExitReason | None = None
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> int | None:
        """Spawn the process; its pid, or ``None`` if it could not start (``run`` says why)."""
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        argv = platform_argv(self.frame)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.cwd,
                **_group_kwargs(),
            )
        except (OSError, ValueError) as exc:
            self._spawn_error = spawn_error_text(exc, argv[0])
            return None
        return self._proc.pid

    def request_stop(self, reason: ExitReason) -> None:
        """Kill the tree (``run`` then reports ``reason``); the first reason wins."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self.output.open()  # a stop before the start was answered must still end the channel
        self._stop.set()

    def kill_now(self) -> None:
        if self._proc is not None:
            kill_tree_now(self._proc)

    async def run(self) -> None:
        """Stream the output and end with one ``terminal.exit``."""
        loop = asyncio.get_running_loop()
        proc = self._proc
        if proc is None:
            await self.output.exit(
                ExitReason.SPAWN_FAILED,
                exit_code=None,
                duration_s=loop.time() - self._started_at,
                stdout_bytes=0,
                stderr_bytes=0,
                error=self._spawn_error or "cannot start the command",
            )
            return
        try:
            killed_for = await self._supervise(proc)
        except asyncio.CancelledError:
            kill_tree_now(proc)
            raise
        reason, exit_code = exit_outcome(killed_for, proc.returncode)
        await self.output.exit(
            reason,
            exit_code=exit_code,
            duration_s=loop.time() - self._started_at,
            stdout_bytes=self.budget.produced[OutputStream.STDOUT],
            stderr_bytes=self.budget.produced[OutputStream.STDERR],
            truncated=self.budget.truncated,
        )

    async def _pump(self, reader: asyncio.StreamReader, stream: OutputStream) -> None:
        while True:
            data = await reader.read(self.limits.chunk_bytes)
            if not data:
                return
            part = self.budget.take(stream, data)
            if part:
                await self.output.chunk(stream, part)

    async def _supervise(self, proc: asyncio.subprocess.Process) -> ExitReason | None:
        """Wait for the end; the reason the agent killed the process, or None if it exited."""
        assert proc.stdout is not None
        assert proc.stderr is not None
        loop = asyncio.get_running_loop()
        grace = self.limits.kill_grace_s
        deadline = self._started_at + self.frame.timeout_s
        pumps = {
            asyncio.create_task(self._pump(proc.stdout, OutputStream.STDOUT)),
            asyncio.create_task(self._pump(proc.stderr, OutputStream.STDERR)),
        }
        exited = asyncio.create_task(proc.wait())
        stopping = asyncio.create_task(self._stop.wait())
        drained = asyncio.create_task(asyncio.wait(pumps))
        killed_for: ExitReason | None = None
        try:
            await asyncio.wait(
                {exited, stopping},
                timeout=max(deadline - loop.time(), 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if exited.done():
                # exited by itself: let the output drain (bounded), unless a stop comes first
                await asyncio.wait(
                    {drained, stopping},
                    timeout=min(grace, max(deadline - loop.time(), 0.0)),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not drained.done():
                    # a leftover child still holds the pipes: end it with its group
                    await kill_tree(proc, grace)
            else:
                killed_for = self._stop_reason if stopping.done() else ExitReason.TIMEOUT
                await kill_tree(proc, grace)
            # the group is dead, so the pipes close; a process that left the group (setsid)
            # and keeps them open is not waited for beyond the grace
            await asyncio.wait({drained}, timeout=grace)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await proc.wait()
        finally:
            for task in (*pumps, exited, stopping, drained):
                task.cancel()
            await asyncio.gather(*pumps, exited, stopping, drained, return_exceptions=True)
        return killed_for
