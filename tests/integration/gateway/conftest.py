"""Fixtures for gateway tests: a key pair, a test NATS client, in-process gateways."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS

from gurutunnel_gateway.config import GatewaySettings
from gurutunnel_gateway.server import Gateway
from gurutunnel_protocol import Subjects
from gurutunnel_protocol.envelope import decode_presence
from gurutunnel_protocol.messages import PresenceEvent

from .credentials import generate_agent_key

StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def agent_key() -> tuple[Ed25519PrivateKey, str]:
    """A fresh Ed25519 key pair: (private key, public key PEM)."""
    return generate_agent_key()


@pytest.fixture
def subjects(subject_prefix: str) -> Subjects:
    return Subjects(subject_prefix)


@pytest.fixture
async def nc(nats_url: str, subjects: Subjects) -> AsyncIterator[NATS]:
    """The test's own NATS connection; deletes this test's stream and bucket at teardown."""
    client = await nats.connect(nats_url, connect_timeout=5)
    yield client
    js = client.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(subjects.presence_stream)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_key_value(subjects.revocation_bucket)
    await client.close()


def gateway_settings(
    nats_url: str, subject_prefix: str, public_pem: str, **overrides: Any
) -> GatewaySettings:
    """Settings with compressed timings for tests (port 0 unless overridden)."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "nats_url": nats_url,
        "subject_prefix": subject_prefix,
        "agent_public_key": public_pem,
        "heartbeat_interval_s": 0.2,
        "close_timeout_s": 2.0,
        "drain_timeout_s": 5.0,
        "reconnect_jitter_max_s": 0.2,
        "publish_timeout_s": 2.0,
        "presence_retry_wait_s": 0.1,
        "sweep_interval_s": 0.1,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@pytest.fixture
async def start_gateway(
    nats_url: str, subject_prefix: str, agent_key: tuple[Ed25519PrivateKey, str], nc: NATS
) -> AsyncIterator[StartGateway]:
    """Start in-process gateways (settings overrides as keywords); all stopped at teardown."""
    started: list[Gateway] = []

    async def start(**overrides: Any) -> Gateway:
        gateway = Gateway(gateway_settings(nats_url, subject_prefix, agent_key[1], **overrides))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop()


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    """One in-process gateway with test settings."""
    return await start_gateway()


async def wait_presence(
    nc: NATS,
    subjects: Subjects,
    agent_id: str,
    *,
    event_type: str,
    conn_id: str | None = None,
    timeout_s: float = 5.0,
) -> tuple[PresenceEvent, dict[str, str]]:
    """Read the presence stream from its start until a matching event (bounded wait)."""
    js = nc.jetstream()
    sub = await js.subscribe(subjects.presence(agent_id), ordered_consumer=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event_type} presence event within {timeout_s}s")
            try:
                msg = await sub.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                continue
            event = decode_presence(msg.data)
            if event.type == event_type and (conn_id is None or event.conn_id == conn_id):
                return event, dict(msg.headers or {})
    finally:
        await sub.unsubscribe()
