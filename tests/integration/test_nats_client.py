"""Both services' NATS clients keep hearing after a cancelled flush. Real NATS.

nats-py 2.16 ends its read loop when the PONG of a cancelled flush arrives; each service's
``bus._connect`` returns a client that drops such a PONG instead (see ``_Client`` there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from gurutunnel_api import bus as api_bus
from gurutunnel_gateway import bus as gateway_bus

Connect = Callable[..., Awaitable[NatsClient]]


@pytest.mark.parametrize(
    "connect", [api_bus._connect, gateway_bus._connect], ids=["api", "gateway"]
)
async def test_client_still_receives_after_a_flush_is_cancelled_before_its_pong(
    connect: Connect, nats_url: str, subject_prefix: str
) -> None:
    nc = await connect(servers=[nats_url], connect_timeout=2, allow_reconnect=False)
    try:
        received = asyncio.Event()

        async def on_message(_: Msg) -> None:
            received.set()

        subject = f"{subject_prefix}.pong-check"
        await nc.subscribe(subject, cb=on_message)
        await nc.flush(timeout=2)
        flush = asyncio.create_task(nc.flush(timeout=5))
        for _ in range(1000):  # until its PING is on the wire, waiting for the PONG
            if nc._pongs:
                break
            await asyncio.sleep(0)
        assert nc._pongs, "the flush never sent its PING"
        flush.cancel()
        await asyncio.sleep(0.2)  # the PONG arrives for the cancelled flush
        await nc.publish(subject, b"after")
        await asyncio.wait_for(received.wait(), 3)
        await nc.flush(timeout=2)  # round trips still complete
    finally:
        await nc.close()
