"""Starting and killing the processes of channels, per OS.

Contract:
- :func:`child_environment` is the one environment every command and shell gets: the agent's,
  minus every variable its settings may be read from (``GT_AGENT_*``, case-insensitively, as
  pydantic-settings matches them), so no credential or agent configuration reaches a child.
- :func:`spawn` starts a process with piped or inherited stdio and returns a :class:`Spawned`
  whose ``exited`` event is set when the process itself ends, independently of its pipes
  (``Process.wait()`` on Python 3.11 only returns once every pipe is closed too, so a command
  whose background child keeps them open would look alive). :meth:`Spawned.close` closes the
  transport (its pipes) and must be called when the channel stops reading them.
- Every process the agent starts leads a new session (POSIX ``start_new_session=True``;
  Windows ``CREATE_NEW_PROCESS_GROUP``), so its session and group ids are its pid. Its tree is
  every process of that session (an interactive shell puts each job in a process group of its
  own, but they stay in the session) plus the leader's live descendants (which covers a child
  that called ``setsid`` while its parent still runs).
- :func:`kill_tree` (POSIX) sends ``first`` (SIGTERM by default; SIGHUP for shells, which ignore
  SIGTERM when interactive) to the whole tree, waits up to ``grace_s`` for the leader to end,
  then sends SIGKILL to the tree as found again, so children that ignore the first signal die
  too. On Windows it
  runs ``taskkill /T /F /PID`` (tree, forced), bounded by ``grace_s``. It never raises for a
  process or group that is already gone, and always returns within about ``2 * grace_s``.
- :func:`kill_tree_now` is the synchronous last resort (SIGKILL to the group) for paths that
  cannot await, such as a task being cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from ..config import ENV_PREFIX

log = logging.getLogger(__name__)


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: ``base`` (default: the agent's) without ``GT_AGENT_*``."""
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if not k.upper().startswith(ENV_PREFIX)}


class _ExitAwareProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """The stream protocol of ``create_subprocess_exec`` plus an event for the process's end."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


@dataclass
class Spawned:
    """A started process, its transport and the event of its end (pipes aside)."""

    proc: asyncio.subprocess.Process
    transport: asyncio.SubprocessTransport
    exited: asyncio.Event

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        """Close the transport and its pipes (idempotent; kills the process if it still runs)."""
        self.transport.close()


_STREAM_LIMIT = 64 * 1024


async def spawn(argv: Sequence[str], **kwargs: Any) -> Spawned:
    """Start ``argv`` like ``asyncio.create_subprocess_exec`` (same keyword arguments)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _ExitAwareProtocol(_STREAM_LIMIT, loop), *argv, **kwargs
    )
    return Spawned(
        asyncio.subprocess.Process(transport, protocol, loop), transport, protocol.exited
    )


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # the pgid was reused by a process we do not own: the tree we started is gone
        return False
    return True


def _tree(leader: int, *, descendants: bool) -> set[int]:
    """Pids of the session led by ``leader`` (and of its live descendants, if asked)."""
    members: set[int] = set()
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == leader:
                members.add(pid)
        except OSError:
            continue  # gone meanwhile, or not ours to inspect
    if not descendants:
        return members
    with contextlib.suppress(psutil.Error):
        members.update(child.pid for child in psutil.Process(leader).children(recursive=True))
    return members


def _signal_tree(leader: int, sig: int, *, alive: bool) -> bool:
    """Send ``sig`` to the leader's group and tree; False if nothing was there.

    ``alive``: the leader is not reaped yet, so its pid cannot have been reused and its
    descendants are safe to look up.
    """
    found = _signal_group(leader, sig)
    for pid in _tree(leader, descendants=alive):
        try:
            os.kill(pid, sig)
            found = True
        except OSError:
            continue
    return found


async def kill_tree(spawned: Spawned, grace_s: float, *, first: int = signal.SIGTERM) -> None:
    """Kill the process and every process of its group (see module docstring)."""
    proc = spawned.proc
    if sys.platform == "win32":
        await _taskkill(proc.pid, grace_s)
        return
    if not _signal_tree(proc.pid, first, alive=proc.returncode is None):
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace_s):
            await spawned.exited.wait()
    _signal_tree(proc.pid, signal.SIGKILL, alive=proc.returncode is None)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace_s):
            await spawned.exited.wait()


def kill_tree_now(spawned: Spawned) -> None:
    """SIGKILL the tree led by the process at once (synchronous last resort)."""
    proc = spawned.proc
    pid = proc.pid
    if sys.platform == "win32":
        with contextlib.suppress(OSError):
            subprocess.Popen(
                ["taskkill", "/T", "/F", "/PID", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        return
    _signal_tree(pid, signal.SIGKILL, alive=proc.returncode is None)


async def _taskkill(pid: int, grace_s: float) -> None:  # pragma: no cover - Windows only
    try:
        killer = await asyncio.create_subprocess_exec(
            "taskkill",
            "/T",
            "/F",
            "/PID",
            str(pid),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        log.warning("taskkill could not be started", extra={"error": str(exc)})
        return
    try:
        async with asyncio.timeout(grace_s):
            await killer.wait()
    except TimeoutError:
        killer.kill()
