"""An interactive shell on a PTY (POSIX only): input, resize, streamed output, one exit frame.

Contract:
- The shell is ``$SHELL`` (else ``/bin/sh``) run with ``-i`` in a new session whose controlling
  terminal is the PTY's slave side, in the working directory the client opened (the first
  allowlist root, held as an fd like a command's: see ``terminal.open_cwd``). The initial window
  size comes from ``shell.open``; ``TERM`` defaults to ``xterm-256color``; the environment is
  ``child_environment()`` (no ``GT_AGENT_*``). On Linux the session and controlling terminal
  are made by util-linux ``setsid --ctty`` exec'd in the child, so no Python code runs between
  fork and exec (the agent has threads); without it (or with a ``setsid`` that is not
  util-linux's) the fallback is ``start_new_session`` plus a ``preexec_fn`` doing TIOCSCTTY.
- :meth:`ShellChannel.feed` queues technician input (at most ``input_buffer_bytes``; beyond it
  it returns False and the client answers ``tunnel.error{agent_backpressure}``); the shell's own
  writer task writes the queue to the master side, so a shell that stops reading stalls only
  itself, never the connection's reader. :meth:`ShellChannel.resize` sets the window size
  (TIOCSWINSZ on the master; the kernel sends SIGWINCH to the foreground process group).
- Output read from the master (pieces of at most ``chunk_bytes``, each send awaited, flow
  controlled with ``window_bytes`` like a command's) leaves as ``terminal.chunk`` (``stream:
  stdout``), numbered like any channel. When the shell exits the
  rest of its output drains (bounded by ``kill_grace_s``) and the channel ends with
  ``terminal.exit{exited, exit_code}``; :meth:`request_stop` (``channel.close``, ``terminal.cancel``
  or session close) sends SIGHUP then SIGKILL to the shell's group and ends it with that reason.
- Windows has no PTY here: the tunnel answers ``shell.open`` with ``not_implemented``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios
from collections import deque
from typing import Any

from gurutunnel_protocol.messages import ExitReason, OutputStream, ShellOpen

from .output import ChannelOutput, Emit
from .process import Spawned, child_environment, kill_tree, kill_tree_now, spawn
from .terminal import WorkDir, best_effort_exit, exit_outcome, spawn_error_text

log = logging.getLogger(__name__)

DEFAULT_SHELL = "/bin/sh"


def set_window_size(fd: int, *, cols: int, rows: int) -> None:
    """TIOCSWINSZ on a PTY fd (struct winsize: rows, cols, xpixel, ypixel)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _acquire_controlling_terminal() -> None:  # pragma: no cover - runs in the child
    # runs after setsid() (start_new_session) and after stdin became the slave: make the PTY
    # the controlling terminal, so job control and SIGWINCH work in the shell
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def find_setsid() -> str | None:
    """util-linux ``setsid`` (it has ``--ctty``), if this is Linux and it is installed."""
    if not sys.platform.startswith("linux"):
        return None
    found = shutil.which("setsid")
    if found is None or os.path.basename(os.path.realpath(found)) != "setsid":
        return None  # absent, or a multi-call binary (busybox) without --ctty
    return found


def shell_command(shell: str, setsid: str | None) -> tuple[list[str], dict[str, Any]]:
    """The argv and spawn options that start ``shell`` with the PTY as controlling terminal."""
    if setsid is not None:
        # the forked child is never a process group leader, so setsid(1) calls setsid() itself
        # without forking again (the pid stays the session leader's), makes stdin (the slave)
        # the controlling terminal and execs the shell
        return [setsid, "--ctty", shell, "-i"], {}
    return [shell, "-i"], {
        "start_new_session": True,
        "preexec_fn": _acquire_controlling_terminal,
    }


class ShellChannel:
    """One PTY shell (see module docstring)."""

    def __init__(
        self,
        frame: ShellOpen,
        *,
        cwd: WorkDir,
        chunk_bytes: int,
        kill_grace_s: float,
        input_buffer_bytes: int,
        emit: Emit,
    ) -> None:
        self.frame = frame
        self.cwd = cwd
        self.chunk_bytes = chunk_bytes
        self.kill_grace_s = kill_grace_s
        self.input_buffer_bytes = input_buffer_bytes
        self.output = ChannelOutput(
            frame.session_id, frame.channel_id, emit, window_bytes=frame.window_bytes
        )
        self.stdout_bytes = 0
        self._input: deque[bytes] = deque()
        self._input_bytes = 0
        self._input_ready = asyncio.Event()
        self._master: int | None = None
        self._spawned: Spawned | None = None
        self._spawn_error: str | None = None
        self._stop = asyncio.Event()
        self._stop_reason: ExitReason | None = None
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._spawned.pid if self._spawned is not None else None

    async def start(self) -> int | None:
        """Open the PTY and spawn the shell; its pid, or ``None`` (``run`` reports why)."""
        self._started_at = asyncio.get_running_loop().time()
        shell = os.environ.get("SHELL") or DEFAULT_SHELL
        env = child_environment()
        env.setdefault("TERM", "xterm-256color")
        argv, options = shell_command(shell, find_setsid())
        cwd = self.cwd.spawn_cwd()
        try:
            master, slave = os.openpty()
        except OSError as exc:
            self.cwd.close()
            self._spawn_error = f"cannot open a pty: {exc.strerror or type(exc).__name__}"
            return None
        try:
            set_window_size(slave, cols=self.frame.cols, rows=self.frame.rows)
            os.set_blocking(master, False)
            self._spawned = await spawn(
                argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, **options
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            os.close(master)
            self._spawn_error = spawn_error_text(exc, argv[0], cwd)
            return None
        finally:
            # the child holds its copies; ours would keep the slave open after the shell ends
            os.close(slave)
            self.cwd.close()
        self._master = master
        return self._spawned.pid

    def feed(self, data: bytes) -> bool:
        """Queue input for the shell; False (nothing queued) if the queue is full."""
        if self._master is None:
            return True  # not started or ending: its exit frame is on the way
        if self._input_bytes + len(data) > self.input_buffer_bytes:
            return False
        self._input.append(data)
        self._input_bytes += len(data)
        self._input_ready.set()
        return True

    async def _writer(self, master: int) -> None:
        """Write queued input to the master side, in order, as fast as the shell reads it."""
        while True:
            while not self._input:
                self._input_ready.clear()
                await self._input_ready.wait()
            data = self._input[0]
            view = memoryview(data)
            while view:
                try:
                    written = os.write(master, view)
                except BlockingIOError:
                    await self._ready(master, writable=True)
                    continue
                except OSError:
                    return  # the shell side is gone; its exit frame follows
                view = view[written:]
            self._input.popleft()
            self._input_bytes -= len(data)

    def resize(self, *, cols: int, rows: int) -> None:
        if self._master is not None:
            with contextlib.suppress(OSError):
                set_window_size(self._master, cols=cols, rows=rows)

    def request_stop(self, reason: ExitReason) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        self.output.open()
        self.output.window.unthrottle()  # what the PTY still holds leaves without waiting for acks
        self._stop.set()

    @property
    def stop_reason(self) -> ExitReason | None:
        return self._stop_reason

    def kill_now(self) -> None:
        if self._spawned is not None:
            kill_tree_now(self._spawned)

    async def abandon(self, reason: ExitReason) -> None:
        """Best-effort exit frame for a channel whose task had to be cancelled (tree killed)."""
        self.kill_now()
        await best_effort_exit(
            self.output,
            self._stop_reason or reason,
            exit_code=self._spawned.proc.returncode if self._spawned is not None else None,
            duration_s=asyncio.get_running_loop().time() - self._started_at,
            stdout_bytes=self.stdout_bytes,
            stderr_bytes=0,
            error="the channel did not end in time; its process tree was killed",
            abandoned=True,
        )

    async def run(self) -> None:
        """Stream the shell's output and end with one ``terminal.exit``."""
        loop = asyncio.get_running_loop()
        spawned, master = self._spawned, self._master
        if spawned is None or master is None:
            await self.output.exit(
                ExitReason.SPAWN_FAILED,
                exit_code=None,
                duration_s=loop.time() - self._started_at,
                stdout_bytes=0,
                stderr_bytes=0,
                error=self._spawn_error or "cannot start the shell",
            )
            return
        try:
            killed_for = await self._supervise(spawned, master)
        except asyncio.CancelledError:
            kill_tree_now(spawned)
            raise
        except Exception:
            # a bug in supervising must not leave the shell running or the channel without end
            log.exception("shell supervision failed", extra={"channel_id": self.frame.channel_id})
            kill_tree_now(spawned)
            await best_effort_exit(
                self.output,
                self._stop_reason or ExitReason.EXITED,
                exit_code=spawned.proc.returncode,
                duration_s=loop.time() - self._started_at,
                stdout_bytes=self.stdout_bytes,
                stderr_bytes=0,
                error="the agent failed while supervising the shell; its tree was killed",
            )
            return
        except BaseException:
            kill_tree_now(spawned)
            raise
        finally:
            # _supervise has cancelled the writer (and its add_writer) before the fd goes
            self._master = None
            self._input.clear()
            os.close(master)
            spawned.close()
        reason, exit_code = exit_outcome(killed_for, spawned.proc.returncode)
        await self.output.exit(
            reason,
            exit_code=exit_code,
            duration_s=loop.time() - self._started_at,
            stdout_bytes=self.stdout_bytes,
            stderr_bytes=0,
        )

    async def _ready(self, fd: int, *, writable: bool = False) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if writable:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            if writable:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def _pump(self, master: int) -> None:
        while True:
            try:
                data = os.read(master, self.output.window.piece_bytes(self.chunk_bytes))
            except BlockingIOError:
                await self._ready(master)
                continue
            except OSError:
                return  # EIO: every holder of the slave side is gone
            if not data:
                return
            self.stdout_bytes += len(data)
            await self.output.chunk(OutputStream.STDOUT, data)

    async def _supervise(self, spawned: Spawned, master: int) -> ExitReason | None:
        grace = self.kill_grace_s
        pump = asyncio.create_task(self._pump(master))
        writer = asyncio.create_task(self._writer(master))
        exited = asyncio.create_task(spawned.exited.wait())
        stopping = asyncio.create_task(self._stop.wait())
        killed_for: ExitReason | None = None
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                await asyncio.wait(
                    {pump, stopping}, timeout=grace, return_when=asyncio.FIRST_COMPLETED
                )
                if not pump.done():
                    # background jobs keep the terminal open, or the reader acknowledges too
                    # slowly: end the group, send what the PTY holds without waiting
                    self.output.window.unthrottle()
                    await kill_tree(spawned, grace, first=signal.SIGHUP)
            else:
                killed_for = self._stop_reason
                # interactive shells ignore SIGTERM; SIGHUP is what a closed terminal sends
                await kill_tree(spawned, grace, first=signal.SIGHUP)
            await asyncio.wait({pump}, timeout=grace)
            await asyncio.wait({exited}, timeout=grace)
        finally:
            for task in (pump, writer, exited, stopping):
                task.cancel()
            await asyncio.gather(pump, writer, exited, stopping, return_exceptions=True)
        return killed_for
