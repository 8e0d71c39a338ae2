"""An interactive shell on a PTY (POSIX only): input, resize, streamed output, one exit frame.

Contract:
- The shell is ``$SHELL`` (else ``/bin/sh``) run with ``-i`` in a new session whose controlling
  terminal is the PTY's slave side, in the working directory the tunnel resolved (the first
  allowlist root). The initial window size comes from ``shell.open``; ``TERM`` defaults to
  ``xterm-256color``.
- :meth:`ShellChannel.write` writes technician input to the master side, bounded by
  ``input_timeout_s`` (a shell that stops reading gets ``TimeoutError``, never an unbounded
  buffer); :meth:`ShellChannel.resize` sets the window size (TIOCSWINSZ on the master; the kernel
  sends SIGWINCH to the foreground process group).
- Output read from the master (pieces of at most ``chunk_bytes``, each send awaited) leaves as
  ``terminal.chunk`` (``stream: stdout``), numbered like any channel. When the shell exits the
  rest of its output drains (bounded by ``kill_grace_s``) and the channel ends with
  ``terminal.exit{exited, exit_code}``; :meth:`request_stop` (``channel.close``, ``terminal.cancel``
  or session close) sends SIGHUP then SIGKILL to the shell's group and ends it with that reason.
- Windows has no PTY here: the tunnel answers ``shell.open`` with ``not_implemented``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import termios
from pathlib import Path

from gurutunnel_protocol.messages import ExitReason, OutputStream, ShellOpen

from .output import ChannelOutput, Emit
from .process import kill_tree, kill_tree_now
from .terminal import exit_outcome, spawn_error_text

DEFAULT_SHELL = "/bin/sh"


def set_window_size(fd: int, *, cols: int, rows: int) -> None:
    """TIOCSWINSZ on a PTY fd (struct winsize: rows, cols, xpixel, ypixel)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _acquire_controlling_terminal() -> None:  # pragma: no cover - runs in the child
    # runs after setsid() (start_new_session) and after stdin became the slave: make the PTY
    # the controlling terminal, so job control and SIGWINCH work in the shell
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class ShellChannel:
    """One PTY shell (see module docstring)."""

    def __init__(
        self,
        frame: ShellOpen,
        *,
        cwd: Path,
        chunk_bytes: int,
        kill_grace_s: float,
        input_timeout_s: float,
        emit: Emit,
    ) -> None:
        self.frame = frame
        self.cwd = cwd
        self.chunk_bytes = chunk_bytes
        self.kill_grace_s = kill_grace_s
        self.input_timeout_s = input_timeout_s
        self.output = ChannelOutput(frame.session_id, frame.channel_id, emit)
        self.stdout_bytes = 0
        self._master: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._spawn_error: str | None = None
        self._stop = asyncio.Event()
        self._stop_reason: ExitReason | None = None
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> int | None:
        """Open the PTY and spawn the shell; its pid, or ``None`` (``run`` reports why)."""
        self._started_at = asyncio.get_running_loop().time()
        shell = os.environ.get("SHELL") or DEFAULT_SHELL
        env = dict(os.environ)
        env.setdefault("TERM", "xterm-256color")
        try:
            master, slave = os.openpty()
        except OSError as exc:
            self._spawn_error = f"cannot open a pty: {exc.strerror or type(exc).__name__}"
            return None
        try:
            set_window_size(slave, cols=self.frame.cols, rows=self.frame.rows)
            os.set_blocking(master, False)
            self._proc = await asyncio.create_subprocess_exec(
                shell,
                "-i",
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_acquire_controlling_terminal,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            os.close(master)
            self._spawn_error = spawn_error_text(exc, shell)
            return None
        finally:
            # the child holds its copies; ours would keep the slave open after the shell ends
            os.close(slave)
        self._master = master
        return self._proc.pid

    async def write(self, data: bytes) -> None:
        """Write input to the shell; TimeoutError if it is not consumed in time."""
        master = self._master
        if master is None:
            return
        view = memoryview(data)
        async with asyncio.timeout(self.input_timeout_s):
            while view:
                try:
                    written = os.write(master, view)
                except BlockingIOError:
                    await self._ready(master, writable=True)
                    continue
                except OSError:
                    return  # the shell side is gone; its exit frame follows
                view = view[written:]

    def resize(self, *, cols: int, rows: int) -> None:
        if self._master is not None:
            with contextlib.suppress(OSError):
                set_window_size(self._master, cols=cols, rows=rows)

    def request_stop(self, reason: ExitReason) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        self.output.open()
        self._stop.set()

    def kill_now(self) -> None:
        if self._proc is not None:
            kill_tree_now(self._proc)

    async def run(self) -> None:
        """Stream the shell's output and end with one ``terminal.exit``."""
        loop = asyncio.get_running_loop()
        proc, master = self._proc, self._master
        if proc is None or master is None:
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
            killed_for = await self._supervise(proc, master)
        except asyncio.CancelledError:
            kill_tree_now(proc)
            raise
        finally:
            self._master = None
            os.close(master)
        reason, exit_code = exit_outcome(killed_for, proc.returncode)
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
                data = os.read(master, self.chunk_bytes)
            except BlockingIOError:
                await self._ready(master)
                continue
            except OSError:
                return  # EIO: every holder of the slave side is gone
            if not data:
                return
            self.stdout_bytes += len(data)
            await self.output.chunk(OutputStream.STDOUT, data)

    async def _supervise(self, proc: asyncio.subprocess.Process, master: int) -> ExitReason | None:
        grace = self.kill_grace_s
        pump = asyncio.create_task(self._pump(master))
        exited = asyncio.create_task(proc.wait())
        stopping = asyncio.create_task(self._stop.wait())
        killed_for: ExitReason | None = None
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                await asyncio.wait(
                    {pump, stopping}, timeout=grace, return_when=asyncio.FIRST_COMPLETED
                )
                if not pump.done():
                    # background jobs keep the terminal open: end them with the group
                    await kill_tree(proc, grace, first=signal.SIGHUP)
            else:
                killed_for = self._stop_reason
                # interactive shells ignore SIGTERM; SIGHUP is what a closed terminal sends
                await kill_tree(proc, grace, first=signal.SIGHUP)
            await asyncio.wait({pump}, timeout=grace)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await proc.wait()
        finally:
            for task in (pump, exited, stopping):
                task.cancel()
            await asyncio.gather(pump, exited, stopping, return_exceptions=True)
        return killed_for
