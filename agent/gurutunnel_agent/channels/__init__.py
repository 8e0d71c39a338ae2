"""Channel implementations inside a tunnel session (terminal, shell, files): the next issue.

The seam: :class:`gurutunnel_agent.tunnel.TunnelManager` owns which channels exist and answers
``terminal.command`` / ``tunnel.data`` with ``tunnel.error{not_implemented}``. A channel
implementation will satisfy :class:`Channel`; the client will hand it the frames of its
``channel_id`` and ``TunnelManager.force_close``/``close_tunnel`` will close it.
"""

from __future__ import annotations

from typing import Protocol

from gurutunnel_protocol.messages import AgentToServer, ChannelType, ServerToAgent


class Channel(Protocol):
    """One channel of a session, fed the frames addressed to its ``channel_id``."""

    channel_id: str
    channel_type: ChannelType

    async def handle(self, frame: ServerToAgent) -> list[AgentToServer]:
        """Answer one frame of this channel."""
        ...

    async def close(self) -> None:
        """Stop everything the channel started (process trees, open files); idempotent."""
        ...


__all__ = ["Channel"]
