"""A tiny in-test agent: connect with a credential, send and receive typed frames."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from websockets.asyncio.client import ClientConnection, connect

from gurutunnel_protocol.envelope import decode_server_to_agent, encode_text
from gurutunnel_protocol.messages import Frame, Heartbeat, HostMetrics, ServerToAgent

RECV_TIMEOUT_S = 5.0


def connect_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/agent/v1/connect"


@asynccontextmanager
async def agent_socket(port: int, credential: str) -> AsyncIterator[ClientConnection]:
    """An agent WebSocket with ``Authorization: Bearer <credential>`` (raises on a refusal)."""
    async with connect(
        connect_url(port),
        additional_headers={"Authorization": f"Bearer {credential}"},
        open_timeout=RECV_TIMEOUT_S,
        close_timeout=2,
    ) as ws:
        yield ws


async def recv_frame(ws: ClientConnection, timeout_s: float = RECV_TIMEOUT_S) -> ServerToAgent:
    """The next frame from the gateway, decoded (bounded wait)."""
    raw = await asyncio.wait_for(ws.recv(), timeout_s)
    return decode_server_to_agent(raw)


async def send_frame(ws: ClientConnection, frame: Frame) -> None:
    await ws.send(encode_text(frame))


def heartbeat(mode: str = "heartbeat", session_id: str | None = None) -> Heartbeat:
    """A valid heartbeat frame with plausible metrics."""
    return Heartbeat(
        sent_at=datetime.now(UTC),
        mode="tunnel" if mode == "tunnel" else "heartbeat",
        session_id=session_id,
        metrics=HostMetrics(
            hostname="test-host",
            os="Linux",
            cpu_percent=1.0,
            cpu_count=2,
            mem_total_bytes=1 << 30,
            mem_used_percent=10.0,
            disk_total_bytes=1 << 34,
            disk_used_percent=20.0,
            boot_time=datetime(2024, 1, 1, tzinfo=UTC),
        ),
    )
