"""Channel runtimes inside a tunnel session: the I/O half of what the tunnel decides.

The seam: :class:`gurutunnel_agent.tunnel.TunnelManager` (sans-I/O) owns which channels exist
and validates every request; it returns actions (``StartCommand``, ``StartShell``,
``StartUpload``, ``StartDownload``, ``FileData``, ``FileAcked``, ``OutputAcked``, ``StopChannel``,
``ShellInput``, ``ResizeShell``, ``EndSession``) that
:class:`gurutunnel_agent.client.AgentClient` carries out with the runtimes here, one task per
channel, owned by the connection:

- :mod:`.terminal`: one command (``terminal.command``), streamed, capped, killed as a tree.
- :mod:`.shell`: an interactive PTY (``shell.open``), POSIX only.
- :mod:`.output`: numbered chunks and the one exit frame of a channel.
- :mod:`.process`: killing a process tree per OS.
- :mod:`.files`: upload and download runtimes (``file.*``), acknowledged, resumable, verified.

Command and shell runtimes satisfy :class:`ChannelRuntime`. File runtimes share its stop
vocabulary (``request_stop``, ``kill_now``, ``pid`` None, ``abandon``) but have no ``output``:
they end with ``file.done`` / ``file.failed`` and answer their request themselves.
"""

from __future__ import annotations

from typing import Protocol

from gurutunnel_protocol.messages import ExitReason

from .output import ChannelOutput


class ChannelRuntime(Protocol):
    """What the client needs from a running channel."""

    output: ChannelOutput

    @property
    def pid(self) -> int | None: ...

    async def start(self) -> int | None:
        """Spawn; the pid, or ``None`` if it could not start (``run`` then reports why)."""
        ...

    async def run(self) -> None:
        """Supervise until the end; always emits exactly one ``terminal.exit``."""
        ...

    def request_stop(self, reason: ExitReason) -> None:
        """Kill the process tree; ``run`` ends with ``reason`` (idempotent, first reason wins)."""
        ...

    def kill_now(self) -> None:
        """SIGKILL the tree synchronously (last resort when ``run`` cannot be awaited)."""
        ...


__all__ = ["ChannelRuntime"]
