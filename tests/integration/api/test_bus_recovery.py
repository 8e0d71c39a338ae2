"""The bus survives a deleted presence consumer or stream, reports it through /readyz, and lets
only domain errors out of ``start()``. Real NATS."""

from __future__ import annotations

import asyncio
import contextlib

import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from gurutunnel_api.bus import BusHandlers, BusUnavailable, NatsBus
from gurutunnel_api.config import ApiSettings
from gurutunnel_protocol import Subjects

from .conftest import FakeGateway as Gateway
from .conftest import Presence, Users, enroll, running_api, wait_until


async def _ignore(*_: object) -> None:
    return None


async def _renewed(*_: object) -> bool:
    return True


def fast_checks(settings: ApiSettings) -> ApiSettings:
    return settings.model_copy(
        update={
            "presence_check_interval_s": 0.1,
            "presence_resubscribe_backoff_s": 0.05,
            "presence_resubscribe_backoff_max_s": 0.2,
        }
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_deleted_presence_consumer_is_recreated_and_a_disconnect_still_closes(
    migrated: ApiSettings, users: Users, nc: NatsClient, presence: Presence
) -> None:
    """After the durable consumer is deleted, a published disconnect still closes the session
    within a bounded time (the consumer is recreated)."""
    async with running_api(fast_checks(migrated)) as api:
        agent = await enroll(api, users.admin)
        gateway = await Gateway(nc=nc, subjects=presence.subjects, agent_id=agent.id).start()
        try:
            await presence.send(gateway.connected())
            opened = await api.client.post(
                "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
            )
            assert opened.status_code == 201, opened.text
            await presence.js.delete_consumer(
                presence.subjects.presence_stream, presence.subjects.presence_consumer
            )
            await presence.publish(gateway.disconnected())

            async def closed() -> bool:
                resp = await api.client.get(
                    f"/api/v1/tunnel/status/{opened.json()['id']}", headers=users.tech.headers
                )
                return bool(resp.json()["state"] == "closed")

            await wait_until(closed, timeout_s=5, what="the disconnect handled after recreation")
        finally:
            await gateway.stop()


async def _add_full_presence_stream(js: JetStreamContext, subjects: Subjects) -> None:
    """The presence stream, admitting one consumer and already holding another: the API's
    durable consumer cannot be made. (Refused alike by every server version, where a filter
    outside the stream's subjects is refused by nats-server 2.9 but accepted by 2.10+.)"""
    await js.add_stream(
        StreamConfig(
            name=subjects.presence_stream, subjects=[subjects.all_presence()], max_consumers=1
        )
    )
    await js.add_consumer(
        subjects.presence_stream, ConsumerConfig(durable_name="other", ack_policy=AckPolicy.NONE)
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_readyz_is_503_while_the_presence_consumer_cannot_be_recreated(
    api_settings: ApiSettings, migrated: ApiSettings, nc: NatsClient, subject_prefix: str
) -> None:
    """A presence stream replaced by one the consumer cannot bind to: /readyz answers 503
    bus_unavailable until the stream is usable again, then 200."""
    subjects = Subjects(subject_prefix)
    js = nc.jetstream(timeout=5)
    async with running_api(fast_checks(migrated)) as api:
        assert (await api.client.get("/readyz")).status_code == 200
        await js.delete_stream(subjects.presence_stream)
        # same name, but full: recreating the consumer keeps failing
        await _add_full_presence_stream(js, subjects)

        async def not_ready() -> bool:
            resp = await api.client.get("/readyz")
            return resp.status_code == 503 and resp.json()["error"]["code"] == "bus_unavailable"

        await wait_until(not_ready, what="/readyz 503 while the consumer is down")
        await js.delete_stream(subjects.presence_stream)

        async def ready() -> bool:
            return (await api.client.get("/readyz")).status_code == 200

        await wait_until(ready, what="/readyz 200 after recreation")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_bus_start_raises_only_bus_unavailable_when_the_consumer_cannot_be_made(
    api_settings: ApiSettings, nc: NatsClient, subject_prefix: str
) -> None:
    """A presence stream the durable consumer cannot be created on: start() raises the domain
    BusUnavailable, not a NATS exception."""
    subjects = Subjects(subject_prefix)
    js = nc.jetstream(timeout=5)
    await _add_full_presence_stream(js, subjects)
    bus = NatsBus(api_settings, BusHandlers(_ignore, _ignore, _renewed))
    try:
        with pytest.raises(BusUnavailable):
            await bus.start()
    finally:
        await bus.close()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(subjects.presence_stream)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_presence_consumer_ends_when_cancelled_as_its_connection_closes(
    api_settings: ApiSettings, nc: NatsClient
) -> None:
    """A cancel that reaches the consumer inside a fetch while the connection closes (nats-py
    turns it into ``ConnectionClosedError``) still ends the consumer task."""
    settings = api_settings.model_copy(
        update={"presence_fetch_timeout_s": 30.0, "presence_resubscribe_backoff_max_s": 0.05}
    )
    bus = NatsBus(settings, BusHandlers(_ignore, _ignore, _renewed))
    await bus.start()
    consumer = bus._consumer
    assert consumer is not None
    await asyncio.sleep(0.2)  # the consumer is now waiting inside a long fetch
    connection = bus._nc
    assert connection is not None
    try:
        consumer.cancel()
        await connection.close()
        done, _ = await asyncio.wait({consumer}, timeout=3)
        assert consumer in done, "the presence consumer kept running after its cancellation"
    finally:
        await bus.close()
