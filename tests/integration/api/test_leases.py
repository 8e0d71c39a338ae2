"""Gateway leases (close path 2): the lease reaper closes the sessions of a gateway that stopped
heartbeating, fences its lost boot, and gives never-seen gateways a grace. Real NATS, both
databases, fake gateways on the bus."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from gurutunnel_api.agents.events import handle_gateway_heartbeat
from gurutunnel_api.agents.leases import LeaseReaper
from gurutunnel_api.agents.models import GatewayLease
from gurutunnel_api.bus import Bus
from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine, make_sessionmaker, utcnow
from gurutunnel_protocol import Subjects, new_id
from gurutunnel_protocol.envelope import decode_control, encode
from gurutunnel_protocol.messages import GatewayHeartbeat, GatewayLeaseLost

from .conftest import (
    Api,
    EnrolledAgent,
    FakeGateway,
    Presence,
    Users,
    enroll,
    running_api,
    wait_until,
)

TTL_S = 1.0
BEAT_S = 0.1
REAP_S = 0.1


@pytest.fixture
def api_settings(api_settings: ApiSettings) -> ApiSettings:
    """Fast reaper rounds; never-seen gateways get a grace longer than any test here."""
    return api_settings.model_copy(
        update={"lease_reap_interval_s": REAP_S, "lease_unknown_grace_s": 60.0}
    )


@dataclass
class Beater:
    """Publishes a gateway's lease heartbeats the way a gateway does."""

    nc: NatsClient
    subjects: Subjects
    gateway_id: str
    boot_id: str = field(default_factory=new_id)
    ttl_s: float = TTL_S
    _task: asyncio.Task[None] | None = None

    async def beat(self, boot_id: str | None = None) -> None:
        heartbeat = GatewayHeartbeat(
            gateway_id=self.gateway_id,
            boot_id=boot_id or self.boot_id,
            at=datetime.now(UTC),
            agents=1,
            lease_ttl_s=self.ttl_s,
        )
        # no flush: cancelling a flush (stop) can kill nats-py's read loop when the PONG comes;
        # the API handles one subscription's messages in order, which the tests rely on instead
        await self.nc.publish(self.subjects.gateway_heartbeat(), encode(heartbeat))

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await self.beat()
                await asyncio.sleep(BEAT_S)

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def sessionmaker_of(api: Api) -> async_sessionmaker[AsyncSession]:
    maker: async_sessionmaker[AsyncSession] = api.app.state.sessionmaker
    return maker


async def lease_of(api: Api, gateway_id: str) -> GatewayLease | None:
    async with sessionmaker_of(api)() as db, db.begin():
        return await db.get(GatewayLease, gateway_id)


async def wait_leased(
    api: Api, gateway_id: str, boot_id: str, *, live: bool = True
) -> GatewayLease:
    """Wait until the lease row names ``boot_id`` (as its live boot, with ``live``)."""
    found: list[GatewayLease] = []

    async def recorded() -> bool:
        lease = await lease_of(api, gateway_id)
        if lease is None or lease.boot_id != boot_id:
            return False
        if live and lease.lost_boot_id == boot_id:
            return False
        found[:] = [lease]
        return True

    await wait_until(recorded, what=f"lease of boot {boot_id} (live: {live})")
    return found[0]


async def open_session(api: Api, users: Users, agent: EnrolledAgent) -> dict[str, object]:
    resp = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert resp.status_code == 201, resp.text
    body: dict[str, object] = resp.json()
    assert body["state"] == "active"
    return body


async def session_state(api: Api, users: Users, session_id: object) -> tuple[str, str | None]:
    resp = await api.client.get(f"/api/v1/tunnel/status/{session_id}", headers=users.tech.headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["state"], resp.json()["close_reason"]


async def audit_rows(api: Api, users: Users, session_id: object) -> list[tuple[str, str | None]]:
    resp = await api.client.get(
        "/api/v1/audit", params={"session_id": str(session_id)}, headers=users.admin.headers
    )
    assert resp.status_code == 200, resp.text
    return sorted((r["action"], r["reason"]) for r in resp.json()["data"])


async def online(api: Api, users: Users, agent_id: str) -> bool:
    resp = await api.client.get(f"/api/v1/agents/{agent_id}", headers=users.tech.headers)
    return bool(resp.json()["online"])


async def wait_closed(api: Api, users: Users, session_id: object, timeout_s: float) -> None:
    async def closed() -> bool:
        return (await session_state(api, users, session_id))[0] == "closed"

    await wait_until(closed, timeout_s=timeout_s, what=f"session {session_id} closed")


CLOSED_BY_LEASE = [
    ("session.active", None),
    ("session.close", "gateway_lost"),
    ("session.open", None),
]


async def session_on_new_boot_outlives_the_ttl(
    api: Api,
    users: Users,
    agent: EnrolledAgent,
    gateway: FakeGateway,
    presence: Presence,
    boot_id: str,
) -> None:
    """The agent reconnects through ``boot_id`` of the gateway and opens a session there: it is
    still active after more than one TTL of reaper rounds."""
    gateway.boot_id, gateway.conn_id = boot_id, new_id()
    await presence.send(gateway.connected())
    again = await open_session(api, users, agent)
    started = time.monotonic()

    async def outlived_ttl() -> bool:
        return time.monotonic() - started > TTL_S + 3 * REAP_S

    await wait_until(outlived_ttl, what="more than one TTL")
    assert await session_state(api, users, again["id"]) == ("active", None)


async def leases_lost_metric(api: Api) -> float:
    """``gurutunnel_api_gateway_leases_lost_total`` as /metrics shows it."""
    resp = await api.client.get("/metrics")
    assert resp.status_code == 200
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == "gurutunnel_api_gateway_leases_lost_total":
                return float(sample.value)
    raise AssertionError("no gurutunnel_api_gateway_leases_lost_total in /metrics")


async def test_session_of_a_gateway_that_stops_beating_closes_gateway_lost_once(
    api: Api,
    users: Users,
    agent: EnrolledAgent,
    gateway: FakeGateway,
    presence: Presence,
    nc: NatsClient,
) -> None:
    """Heartbeats stop: within ttl + reap interval + 1 s the session is closed gateway_lost with
    one audit row, its agent is offline and told to close, the boot is recorded lost; an agent
    on another, still beating gateway keeps its session and stays online."""
    beats = Beater(nc, gateway.subjects, gateway.gateway_id, boot_id=gateway.boot_id)
    beats.start()
    other_agent = await enroll(api, users.admin, "pc-02")
    other = await FakeGateway(nc=nc, subjects=gateway.subjects, agent_id=other_agent.id).start()
    other_beats = Beater(nc, gateway.subjects, other.gateway_id, boot_id=other.boot_id)
    other_beats.start()
    try:
        await wait_leased(api, gateway.gateway_id, gateway.boot_id)
        await wait_leased(api, other.gateway_id, other.boot_id)
        await presence.send(gateway.connected())
        await presence.send(other.connected())
        opened = await open_session(api, users, agent)
        assert opened["gateway_id"] == gateway.gateway_id
        kept = await open_session(api, users, other_agent)

        await beats.stop()
        stopped = time.monotonic()
        await wait_closed(api, users, opened["id"], timeout_s=TTL_S + REAP_S + 1.0)
        assert time.monotonic() - stopped <= TTL_S + REAP_S + 1.0
        assert await session_state(api, users, opened["id"]) == ("closed", "gateway_lost")
        assert await audit_rows(api, users, opened["id"]) == CLOSED_BY_LEASE
        assert await online(api, users, agent.id) is False
        lease = await lease_of(api, gateway.gateway_id)
        assert lease is not None
        assert (lease.lost_boot_id, lease.boot_id) == (gateway.boot_id, gateway.boot_id)
        assert lease.lost_at is not None
        assert await leases_lost_metric(api) == 1.0

        async def told() -> bool:
            return any(c.session_id == opened["id"] for c in gateway.closes())

        await wait_until(told, what="tunnel.close for the session of the lost gateway")
        # the live gateway's session and agent are untouched
        assert await session_state(api, users, kept["id"]) == ("active", None)
        assert await online(api, users, other_agent.id) is True
    finally:
        await beats.stop()
        await other_beats.stop()
        await other.stop()


async def test_late_heartbeat_of_lost_boot_revives_nothing_and_new_boot_gets_a_live_lease(
    api: Api,
    users: Users,
    agent: EnrolledAgent,
    gateway: FakeGateway,
    presence: Presence,
    nc: NatsClient,
) -> None:
    """A heartbeat of the lost boot leaves the lease lost and the session closed (no new audit
    row); a new boot's heartbeats give a live lease that outlives the TTL, and a new session on
    it stays active."""
    beats = Beater(nc, gateway.subjects, gateway.gateway_id, boot_id=gateway.boot_id)
    beats.start()
    sentinel = Beater(nc, gateway.subjects, new_id())
    try:
        await wait_leased(api, gateway.gateway_id, gateway.boot_id)
        await presence.send(gateway.connected())
        opened = await open_session(api, users, agent)
        await beats.stop()
        await wait_closed(api, users, opened["id"], timeout_s=TTL_S + REAP_S + 1.0)
        lost = await lease_of(api, gateway.gateway_id)
        assert lost is not None and lost.lost_boot_id == gateway.boot_id

        # the lost boot wakes up; handled in order, so once the sentinel's beat is recorded the
        # late one was handled too
        control = await nc.subscribe(gateway.subjects.gateway_control())
        await nc.flush()
        await beats.beat()
        await sentinel.beat()
        # ... and the API tells that gateway boot to fence itself
        notice = decode_control((await control.next_msg(timeout=5)).data)
        await control.unsubscribe()
        assert notice == GatewayLeaseLost(gateway_id=gateway.gateway_id, boot_id=gateway.boot_id)
        # recorded is enough: a lone beat's lease may expire before this looks (a busy machine)
        await wait_leased(api, sentinel.gateway_id, sentinel.boot_id, live=False)
        after = await lease_of(api, gateway.gateway_id)
        assert after is not None
        assert (after.boot_id, after.lost_boot_id) == (gateway.boot_id, gateway.boot_id)
        assert after.renewed_at == lost.renewed_at
        assert await session_state(api, users, opened["id"]) == ("closed", "gateway_lost")
        assert await audit_rows(api, users, opened["id"]) == CLOSED_BY_LEASE

        # the gateway fenced itself and came back as a new boot
        reborn = Beater(nc, gateway.subjects, gateway.gateway_id)
        reborn.start()
        try:
            fresh = await wait_leased(api, gateway.gateway_id, reborn.boot_id)
            assert fresh.lost_boot_id == gateway.boot_id
            # and the agent reconnected through the new boot
            await session_on_new_boot_outlives_the_ttl(
                api, users, agent, gateway, presence, reborn.boot_id
            )
            lease = await lease_of(api, gateway.gateway_id)
            assert lease is not None and lease.lost_boot_id != lease.boot_id
        finally:
            await reborn.stop()
    finally:
        await beats.stop()


async def test_two_reapers_close_each_session_once(
    api_settings: ApiSettings, users: Users, nc: NatsClient, subject_prefix: str
) -> None:
    """Two replicas' reapers racing over one expired lease: one marks it lost, every session is
    closed exactly once (one close audit row each, closes counted once across both)."""
    settings = api_settings.model_copy(update={"lease_reap_interval_s": 3600.0})
    subjects = Subjects(subject_prefix)
    gateway_id = new_id()
    async with running_api(settings) as api:
        gateways = []
        for i in range(8):
            enrolled = await enroll(api, users.admin, f"pc-{i}")
            gateways.append(
                await FakeGateway(
                    nc=nc, subjects=subjects, agent_id=enrolled.id, gateway_id=gateway_id
                ).start()
            )
        beats = Beater(nc, subjects, gateway_id)
        # beating until seen: the API's subscription may not be at the server for the first one
        beats.start()
        try:
            await wait_leased(api, gateway_id, beats.boot_id)
            ids = []
            for gw in gateways:
                resp = await api.client.post(
                    "/api/v1/tunnel/open",
                    json={"agent_id": gw.agent_id},
                    headers=users.tech.headers,
                )
                assert resp.status_code == 201, resp.text
                ids.append(resp.json()["id"])
            await beats.stop()
            # heartbeats are handled in order: once this one is recorded, no beat is in flight
            sentinel = Beater(nc, subjects, new_id())
            await sentinel.beat()
            await wait_leased(api, sentinel.gateway_id, sentinel.boot_id, live=False)

            engines = [make_engine(settings) for _ in range(2)]
            try:
                bus: Bus = api.app.state.bus
                reapers = [
                    LeaseReaper(make_sessionmaker(engine), bus=bus, settings=settings)
                    for engine in engines
                ]
                later = utcnow() + timedelta(seconds=TTL_S + 1)
                closed = await asyncio.gather(*(r.reap(now=later) for r in reapers))
                assert sum(closed) == len(ids)
                # and once more, both: nothing left to close
                again = await asyncio.gather(*(r.reap(now=later) for r in reapers))
                assert again == [0, 0]
            finally:
                for engine in engines:
                    await engine.dispose()
            for session_id in ids:
                assert await session_state(api, users, session_id) == ("closed", "gateway_lost")
                assert await audit_rows(api, users, session_id) == CLOSED_BY_LEASE
            lease = await lease_of(api, gateway_id)
            assert lease is not None and lease.lost_boot_id == beats.boot_id
        finally:
            await beats.stop()
            for gw in gateways:
                await gw.stop()


async def test_session_of_a_never_seen_gateway_closes_only_after_the_grace(
    api_settings: ApiSettings, users: Users, nc: NatsClient, subject_prefix: str
) -> None:
    """No heartbeat ever: the reaper leaves the session alone until it has known the gateway for
    lease_unknown_grace_s, then closes it gateway_lost (driven with a controlled clock)."""
    settings = api_settings.model_copy(
        update={"lease_reap_interval_s": 3600.0, "lease_unknown_grace_s": 5.0}
    )
    async with running_api(settings) as api:
        enrolled = await enroll(api, users.admin)
        gw = await FakeGateway(
            nc=nc, subjects=Subjects(subject_prefix), agent_id=enrolled.id
        ).start()
        try:
            opened = await open_session(api, users, enrolled)
            reaper = LeaseReaper(sessionmaker_of(api), bus=api.app.state.bus, settings=settings)
            t0 = utcnow()
            assert await reaper.reap(now=t0) == 0
            assert await reaper.reap(now=t0 + timedelta(seconds=4.9)) == 0
            assert await session_state(api, users, opened["id"]) == ("active", None)
            assert await reaper.reap(now=t0 + timedelta(seconds=5.0)) == 1
            assert await session_state(api, users, opened["id"]) == ("closed", "gateway_lost")
            assert await audit_rows(api, users, opened["id"]) == CLOSED_BY_LEASE
        finally:
            await gw.stop()


async def test_never_seen_gateway_session_closed_by_running_api_after_grace(
    api_settings: ApiSettings, users: Users, nc: NatsClient, subject_prefix: str
) -> None:
    """The lifespan's reaper closes a session of a gateway that never beat, not before the
    grace has passed since the session existed."""
    grace_s = 1.0
    settings = api_settings.model_copy(update={"lease_unknown_grace_s": grace_s})
    async with running_api(settings) as api:
        enrolled = await enroll(api, users.admin)
        gw = await FakeGateway(
            nc=nc, subjects=Subjects(subject_prefix), agent_id=enrolled.id
        ).start()
        try:
            before_open = time.monotonic()
            opened = await open_session(api, users, enrolled)
            await wait_closed(api, users, opened["id"], timeout_s=grace_s + REAP_S + 1.0)
            assert time.monotonic() - before_open >= grace_s
            assert await session_state(api, users, opened["id"]) == ("closed", "gateway_lost")
        finally:
            await gw.stop()


async def test_lease_renewed_before_the_api_started_is_judged_from_its_start(
    migrated: ApiSettings, nc: NatsClient, subject_prefix: str
) -> None:
    """After an API restart, a lease last renewed long ago expires one TTL after the reaper's
    start, not at once: the gateway's heartbeats were lost while no API listened."""
    settings = migrated.model_copy(update={"lease_reap_interval_s": 3600.0})
    async with running_api(settings) as api:
        beats = Beater(nc, Subjects(subject_prefix), new_id())
        # beating until seen: the API's subscription may not be at the server for the first one
        beats.start()
        try:
            lease = await wait_leased(api, beats.gateway_id, beats.boot_id)
        finally:
            await beats.stop()
        started = lease.renewed_at + timedelta(seconds=100)
        reaper = LeaseReaper(
            sessionmaker_of(api), bus=api.app.state.bus, settings=settings, started_at=started
        )
        await reaper.reap(now=started + timedelta(seconds=TTL_S - 0.1))
        kept = await lease_of(api, beats.gateway_id)
        assert kept is not None and kept.lost_boot_id is None
        await reaper.reap(now=started + timedelta(seconds=TTL_S + 0.1))
        lost = await lease_of(api, beats.gateway_id)
        assert lost is not None and lost.lost_boot_id == beats.boot_id


async def test_first_heartbeats_of_a_gateway_on_two_replicas_both_succeed(
    api_settings: ApiSettings, api: Api
) -> None:
    """Two replicas handling the first heartbeat of the same new gateway at once: neither
    raises (race-safe upsert) and one lease row results."""
    engines = [make_engine(api_settings) for _ in range(2)]
    try:
        makers = [make_sessionmaker(engine) for engine in engines]
        for _ in range(10):
            gateway_id = new_id()
            beats = [
                GatewayHeartbeat(
                    gateway_id=gateway_id,
                    boot_id=new_id(),
                    at=datetime.now(UTC),
                    agents=0,
                    lease_ttl_s=TTL_S,
                )
                for _ in makers
            ]
            await asyncio.gather(
                *(handle_gateway_heartbeat(m, b) for m, b in zip(makers, beats, strict=True))
            )
            async with makers[0]() as db, db.begin():
                rows = list(
                    await db.scalars(
                        select(GatewayLease).where(col(GatewayLease.gateway_id) == gateway_id)
                    )
                )
            assert len(rows) == 1
            assert rows[0].boot_id in {b.boot_id for b in beats}
    finally:
        for engine in engines:
            await engine.dispose()


async def test_gateway_restarted_under_its_id_closes_the_old_boots_sessions_only(
    api: Api,
    users: Users,
    agent: EnrolledAgent,
    gateway: FakeGateway,
    presence: Presence,
    nc: NatsClient,
) -> None:
    """A gateway killed and restarted under the same id within its TTL (compose's restart,
    a container restart in the same pod): its lease never expires, yet the sessions of the old
    boot's connections close gateway_lost once the new boot beats, while a session on a
    connection of the new boot stays active beyond the TTL."""
    beats = Beater(nc, gateway.subjects, gateway.gateway_id, boot_id=gateway.boot_id)
    beats.start()
    reborn = Beater(nc, gateway.subjects, gateway.gateway_id)
    try:
        await wait_leased(api, gateway.gateway_id, gateway.boot_id)
        await presence.send(gateway.connected())
        opened = await open_session(api, users, agent)
        await beats.stop()
        reborn.start()  # at once: the old boot's lease never runs out
        await wait_closed(api, users, opened["id"], timeout_s=TTL_S + REAP_S + 1.0)
        assert await session_state(api, users, opened["id"]) == ("closed", "gateway_lost")
        lease = await lease_of(api, gateway.gateway_id)
        assert lease is not None
        assert (lease.boot_id, lease.lost_boot_id) == (reborn.boot_id, gateway.boot_id)

        # the agent reconnects through the new boot: its new session is not touched
        await session_on_new_boot_outlives_the_ttl(
            api, users, agent, gateway, presence, reborn.boot_id
        )
    finally:
        await beats.stop()
        await reborn.stop()
