"""A scripted agent for end-to-end tests: a real WebSocket client that answers as told.

It speaks the real protocol to the real gateway, but lets a test decide whether to answer
``tunnel.open`` (to provoke the API's timeout) — something the real agent never does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect

from gurutunnel_protocol.envelope import decode_server_to_agent, encode_text
from gurutunnel_protocol.messages import TunnelClose, TunnelClosed, TunnelOpen, TunnelReady, Welcome


@dataclass
class ScriptedAgent:
    answer_open: bool = False
    welcome: Welcome | None = None
    opens_seen: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = decode_server_to_agent(raw)
            if isinstance(frame, Welcome):
                self.welcome = frame
                self.ready.set()
            elif isinstance(frame, TunnelOpen):
                self.opens_seen += 1
                if self.answer_open:
                    await ws.send(
                        encode_text(TunnelReady(req_id=frame.req_id, session_id=frame.session_id))
                    )
            elif isinstance(frame, TunnelClose):
                await ws.send(
                    encode_text(TunnelClosed(req_id=frame.req_id, session_id=frame.session_id))
                )


@contextlib.asynccontextmanager
async def scripted_agent(
    url: str, credential: str, *, answer_open: bool
) -> AsyncIterator[ScriptedAgent]:
    """Connect a scripted agent; it is disconnected when the block ends."""
    agent = ScriptedAgent(answer_open=answer_open)
    async with connect(
        url, additional_headers={"Authorization": f"Bearer {credential}"}, open_timeout=5
    ) as ws:
        task = asyncio.create_task(agent.run(ws))
        try:
            await asyncio.wait_for(agent.ready.wait(), timeout=5)
            yield agent
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
