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
  buffer; with ``window_bytes`` also flow control: see ``.output``). Output beyond the cap
  (:class:`OutputBudget`) is read and dropped, and the exit frame says ``truncated``;
  ``stdout_bytes``/``stderr_bytes`` count everything the process wrote.
- When the process exits by itself, its output may drain for ``kill_grace_s`` more; a leftover
  child still holding the pipes after that is killed with its group (the exit stays ``exited``).
- The channel ends with exactly one ``terminal.exit`` whatever happens (``exited`` with the exit
  code, negative for a signal; ``timeout``; ``cancelled``; ``session_closed``; ``spawn_failed``
  with the reason), unless its task is cancelled outright, in which case the tree is SIGKILLed.
- :func:`resolve_cwd` is the working-directory policy: the real path (symlinks resolved) of an
  existing directory inside the real path of an allowlist root; anything else raises
  :class:`~gurutunnel_agent.tunnel.CwdNotAllowed`. :func:`open_cwd` applies it and then holds
  the directory itself, not its name: on Linux it opens every component of the real path with
  ``O_NOFOLLOW`` (a component swapped for a symlink after the check is refused), checks the
  open directory's own real path against the allowlist again, and the process is started in
  ``/proc/self/fd/<fd>`` (the kernel follows the open file, not a name, so a directory renamed
  or replaced meanwhile cannot redirect it). Elsewhere the child's real working directory is
  checked right after the spawn and a child outside the allowlist is killed (``spawn_failed``).
  Both are blocking filesystem calls: the client runs them on a worker thread, bounded.
- The child's environment is :func:`~gurutunnel_agent.channels.process.child_environment`
  (no ``GT_AGENT_*`` variable). On Windows ``argv[0]`` naming a ``.bat``/``.cmd`` file is refused
  (``invalid_command``, in ``tunnel.check_command``): CreateProcess runs those through
  ``cmd.exe``, which would interpret ``&``, ``|`` ... in the other items.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from gurutunnel_protocol.messages import ExitReason, OutputStream, Terminal

from ..tunnel import CwdNotAllowed
from .output import ChannelOutput, Emit
from .process import Spawned, child_environment, kill_tree, kill_tree_now, spawn

log = logging.getLogger(__name__)


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


def _real_roots(allowlist: Sequence[Path]) -> list[Path]:
    roots: list[Path] = []
    for root in allowlist:
        try:
            roots.append(root.resolve(strict=False))
        except (OSError, RuntimeError):
            continue
    return roots


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


_PROC_SELF_FD = Path("/proc/self/fd")


@dataclass
class WorkDir:
    """A checked working directory: its real path and, on Linux, an open fd on it."""

    path: Path
    roots: tuple[Path, ...] = ()
    fd: int | None = field(default=None, repr=False)

    def spawn_cwd(self) -> str:
        """What to give ``cwd=``: the open directory itself when there is one."""
        if self.fd is not None:
            return f"{_PROC_SELF_FD}/{self.fd}"
        return str(self.path)

    def close(self) -> None:
        """Close the fd (idempotent); call once the process was started (or not)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def child_is_inside(self, pid: int) -> bool:
        """Whether ``pid`` runs inside the allowlist (the check where no fd is held)."""
        try:
            return _inside(Path(os.path.realpath(psutil.Process(pid).cwd())), self.roots)
        except psutil.NoSuchProcess:
            return True  # already gone: nothing runs anywhere
        except (psutil.Error, OSError):
            return False


def open_dir(real: Path, allowlist: Sequence[Path]) -> WorkDir:
    """Hold the checked real path ``real`` open (Linux; see module docstring)."""
    roots = tuple(_real_roots(allowlist))
    if not _PROC_SELF_FD.is_dir():
        return WorkDir(real, roots)
    flags = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)
    try:
        fd = os.open("/", flags)
    except OSError:
        raise CwdNotAllowed("the working directory cannot be opened") from None
    try:
        for part in real.parts[1:]:
            # no symlink may appear on the way: the real path was resolved just before, so a
            # symlink here was swapped in after the check
            child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise CwdNotAllowed("the working directory is not a directory")
        held = Path(os.readlink(f"{_PROC_SELF_FD}/{fd}"))
        if not held.is_absolute() or not _inside(held, roots):
            raise CwdNotAllowed("the working directory is outside the agent's allowlist")
    except CwdNotAllowed:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        raise CwdNotAllowed("the working directory changed while it was checked") from None
    return WorkDir(held, roots, fd)


def open_cwd(cwd: str | None, allowlist: Sequence[Path]) -> WorkDir:
    """:func:`resolve_cwd`, then :func:`open_dir` on the result (blocking: use a thread)."""
    return open_dir(resolve_cwd(cwd, allowlist), allowlist)


def spawn_error_text(exc: BaseException, program: str, cwd: str | None = None) -> str:
    """A short reason for a failed spawn (never a stack trace)."""
    name = program[:200]
    if cwd is not None and isinstance(exc, OSError) and exc.filename == cwd:
        # the chdir failed, not the exec: the directory vanished after it was checked
        return f"working directory unavailable: {exc.strerror or type(exc).__name__}"
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
    inline_result_bytes: int = 0
    """Output that may be held for the ``terminal.started`` answer (``ChannelOutput``)."""


class CommandChannel:
    """Run one ``terminal.command`` (see module docstring)."""

    def __init__(self, frame: Terminal, *, cwd: WorkDir, limits: CommandLimits, emit: Emit) -> None:
        self.frame = frame
        self.cwd = cwd
        self.limits = limits
        self.output = ChannelOutput(
            frame.session_id,
            frame.channel_id,
            emit,
            hold_bytes=limits.inline_result_bytes,
            window_bytes=frame.window_bytes,
        )
        cap = limits.max_output_bytes
        if frame.max_output_bytes is not None:
            cap = min(cap, frame.max_output_bytes)
        self.budget = OutputBudget(cap)
        self._spawned: Spawned | None = None
        self._spawn_error: str | None = None
        self._stop = asyncio.Event()
        self._stop_reason: ExitReason | None = None
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._spawned.pid if self._spawned is not None else None

    @property
    def stop_reason(self) -> ExitReason | None:
        return self._stop_reason

    async def start(self) -> int | None:
        """Spawn the process; its pid, or ``None`` if it could not start (``run`` says why)."""
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        argv = platform_argv(self.frame)
        cwd = self.cwd.spawn_cwd()
        held = self.cwd.fd is not None
        try:
            # the chdir happens in the child before it closes inherited fds, so the held
            # directory fd need not be passed on to (and leaked into) the command
            self._spawned = await spawn(
                argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=child_environment(),
                **_group_kwargs(),
            )
        except (OSError, ValueError) as exc:
            self._spawn_error = spawn_error_text(exc, argv[0], cwd)
            return None
        finally:
            self.cwd.close()
        if not held and not self.cwd.child_is_inside(self._spawned.pid):
            # no fd could be held (not Linux): the directory was swapped after the check
            kill_tree_now(self._spawned)
            self._spawned.close()
            self._spawned = None
            self._spawn_error = "the working directory changed while the command started"
            return None
        return self._spawned.pid

    def request_stop(self, reason: ExitReason) -> None:
        """Kill the tree (``run`` then reports ``reason``); the first reason wins."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self.output.open_for_stop()  # a stop before the start was answered still ends it
        self.output.window.unthrottle()  # what the pipes still hold leaves without waiting for acks
        self._stop.set()

    def kill_now(self) -> None:
        if self._spawned is not None:
            kill_tree_now(self._spawned)

    async def abandon(self, reason: ExitReason) -> None:
        """Best-effort exit frame for a channel whose task had to be cancelled (tree killed)."""
        self.kill_now()
        if self._spawned is not None:
            self._spawned.close()
        await best_effort_exit(
            self.output,
            self._stop_reason or reason,
            exit_code=self._spawned.proc.returncode if self._spawned is not None else None,
            duration_s=asyncio.get_running_loop().time() - self._started_at,
            error="the channel did not end in time; its process tree was killed",
            stdout_bytes=self.budget.produced[OutputStream.STDOUT],
            stderr_bytes=self.budget.produced[OutputStream.STDERR],
            abandoned=True,
        )

    async def run(self) -> None:
        """Stream the output and end with one ``terminal.exit``."""
        loop = asyncio.get_running_loop()
        spawned = self._spawned
        if spawned is None:
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
            killed_for = await self._supervise(spawned)
        except asyncio.CancelledError:
            kill_tree_now(spawned)
            raise
        except Exception:
            # a bug in supervising must not leave the tree running or the channel without end
            log.exception("command supervision failed", extra={"channel_id": self.frame.channel_id})
            kill_tree_now(spawned)
            await best_effort_exit(
                self.output,
                self._stop_reason or ExitReason.EXITED,
                exit_code=spawned.proc.returncode,
                duration_s=loop.time() - self._started_at,
                error="the agent failed while supervising the command; its tree was killed",
                stdout_bytes=self.budget.produced[OutputStream.STDOUT],
                stderr_bytes=self.budget.produced[OutputStream.STDERR],
            )
            return
        except BaseException:
            kill_tree_now(spawned)
            raise
        finally:
            spawned.close()
        reason, exit_code = exit_outcome(killed_for, spawned.proc.returncode)
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
            data = await reader.read(self.output.window.piece_bytes(self.limits.chunk_bytes))
            if not data:
                return
            part = self.budget.take(stream, data)
            if part:
                await self.output.chunk(stream, part)

    async def _supervise(self, spawned: Spawned) -> ExitReason | None:
        """Wait for the end; the reason the agent killed the process, or None if it exited."""
        proc = spawned.proc
        assert proc.stdout is not None
        assert proc.stderr is not None
        loop = asyncio.get_running_loop()
        grace = self.limits.kill_grace_s
        deadline = self._started_at + self.frame.timeout_s
        pumps = {
            asyncio.create_task(self._pump(proc.stdout, OutputStream.STDOUT)),
            asyncio.create_task(self._pump(proc.stderr, OutputStream.STDERR)),
        }
        # the process's own end, not Process.wait(): on 3.11 that also waits for the pipes
        exited = asyncio.create_task(spawned.exited.wait())
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
                    # a leftover child still holds the pipes, or the reader acknowledges too
                    # slowly: end the group, send what the pipes hold without waiting
                    self.output.window.unthrottle()
                    await kill_tree(spawned, grace)
            else:
                killed_for = self._stop_reason if stopping.done() else ExitReason.TIMEOUT
                self.output.window.unthrottle()
                await kill_tree(spawned, grace)
            # the group is dead, so the pipes close; a process that left the group (setsid)
            # and keeps them open is not waited for beyond the grace (run() then closes the
            # transport, so its pipes do not leak)
            await asyncio.wait({drained}, timeout=grace)
            await asyncio.wait({exited}, timeout=grace)
        finally:
            for task in (*pumps, exited, stopping, drained):
                task.cancel()
            await asyncio.gather(*pumps, exited, stopping, drained, return_exceptions=True)
        return killed_for


async def best_effort_exit(
    output: ChannelOutput,
    reason: ExitReason,
    *,
    exit_code: int | None,
    duration_s: float,
    stdout_bytes: int,
    stderr_bytes: int,
    error: str,
    abandoned: bool = False,
) -> None:
    """The channel's one exit frame if it was not sent yet; a failure here is only logged.
    ``abandoned``: the channel's task (and any answer of its own) is over, so nothing is held
    for an answer any more; otherwise an answer still on its way opens the output itself."""
    if output.exited:
        return
    if abandoned:
        output.release()
        output.open()
    else:
        output.open_for_stop()
    try:
        await output.exit(
            reason,
            exit_code=exit_code,
            duration_s=duration_s,
            stdout_bytes=stdout_bytes,
            stderr_bytes=stderr_bytes,
            error=error,
        )
    except Exception:
        log.exception("exit frame could not be sent", extra={"channel_id": output.channel_id})
