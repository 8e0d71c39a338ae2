"""NATS faults under a real stack: restart mid-stream, an outage past the gateway lease, and a
client that spent its reconnect budget.

One NATS server of this module's own (killed with SIGKILL and started again on the same port
and store), the real ``gurutunnel-api serve`` (SQLite), ``gurutunnel-gateway`` and
``gurutunnel-agent`` processes. Every test leaves NATS running and the stack ready again.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from devstack.processes import ManagedProcess, executable, free_port, http_ok
from devstack.stack import Stack
from tests.support.faults import (
    COUNTER_COMMAND,
    Api,
    PrivateNats,
    eventually,
    exec_stream,
    silent_losses,
    status_of,
)

from .conftest import (
    API_ENV,
    LEASE_REAP_INTERVAL_S,
    LEASE_TTL_S,
    Figure,
    running_stack,
)

pytestmark = pytest.mark.slow

ADMIN = "admin"
REQUEST_TIMEOUT_S = float(API_ENV["GT_API_REQUEST_TIMEOUT_S"])
PASSWORD = secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def nats_server() -> Iterator[PrivateNats]:
    server = PrivateNats()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def stack(nats_server: PrivateNats, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("nats-faults"),
        nats_url=nats_server.url,
        database_url=None,
        prefix="f",
        admin=ADMIN,
        password=PASSWORD,
    ) as s:
        yield s


def gateway_url(stack: Stack, index: int = 0) -> str:
    return f"http://127.0.0.1:{stack.gateways[index][1]}"


async def both_ready(stack: Stack) -> bool:
    api, _ = await status_of(f"{stack.api_url}/readyz")
    gateway, _ = await status_of(f"{gateway_url(stack)}/readyz")
    return api == 200 and gateway == 200


@pytest.fixture
async def api(stack: Stack, nats_server: PrivateNats) -> AsyncIterator[Api]:
    """An admin client, once NATS runs and API and gateway are ready (a failed test before
    may have left them recovering)."""
    if nats_server.proc is None:
        await asyncio.to_thread(nats_server.start)
    await eventually(lambda: both_ready(stack), timeout_s=15, what="stack ready")
    async with Api.login(stack, ADMIN, PASSWORD) as client:
        yield client


async def restart_nats(server: PrivateNats) -> None:
    await asyncio.to_thread(server.kill)
    await asyncio.to_thread(server.start)


async def lease_renewed_at(stack: Stack, gateway_id: str = "gw1") -> datetime:
    engine = create_async_engine(stack.database_url)
    try:
        async with engine.connect() as conn:
            value = await conn.scalar(
                sa.text("SELECT renewed_at FROM gateway_lease WHERE gateway_id = :g"),
                {"g": gateway_id},
            )
    finally:
        await engine.dispose()
    assert value is not None
    renewed = datetime.fromisoformat(str(value))
    # SQLite keeps naive UTC (see gurutunnel_api.db.UTCDateTime)
    return renewed if renewed.tzinfo else renewed.replace(tzinfo=UTC)


async def test_nats_restart_mid_stream_keeps_the_command_going_with_gaps_marked(
    stack: Stack, nats_server: PrivateNats, api: Api, figure: Figure
) -> None:
    """NATS is killed and restarted while a command streams: API and gateway reconnect on
    their own, the output goes on (any lost frames show as gap markers, none silently), the
    technician's cancel still reaches the agent, and the session stays active."""
    agent = await api.enroll(f"stream-{secrets.token_hex(3)}")
    proc = stack.start_agent(agent)
    try:
        await api.wait_online(agent.id)
        session_id = await api.open(agent.id)
        async with exec_stream(api, session_id, {"command": COUNTER_COMMAND}) as stream:
            await stream.wait_lines(20, timeout_s=10)
            await restart_nats(nats_server)
            before = stream.lines()
            reconnect_s = await eventually(
                lambda: both_ready(stack), timeout_s=10, what="API and gateway ready again"
            )
            # output keeps coming through the subscriptions that lived across the restart
            await stream.wait_lines(before + 25, timeout_s=10)
            assert stream.channel_id is not None
            cancel = await api.client.post(f"/tunnel/{session_id}/exec/{stream.channel_id}/cancel")
            assert cancel.status_code == 202, cancel.text
            last = await stream.wait_end(timeout_s=10)
        assert last["event"] == "exit", stream.events[-3:]
        assert last["reason"] == "cancelled", last
        gaps = [e for e in stream.events if e["event"] == "gap"]
        assert silent_losses(stream.events) == 0, gaps
        assert (await api.session(session_id))["state"] == "active"
        figure("nats_restart_ready_again_s", reconnect_s, "s")
        figure("nats_restart_gap_markers", len(gaps), "gaps")
        figure("nats_restart_lines_lost_without_marker", silent_losses(stream.events), "lines")
    finally:
        proc.stop()


async def test_every_subscription_comes_back_after_a_nats_restart(
    stack: Stack, nats_server: PrivateNats, api: Api, figure: Figure
) -> None:
    """After a NATS restart: agent and gateway heartbeats reach the API again (core queue
    subscriptions), a command goes through the gateway's command subscription, a killed agent's
    disconnect closes its session (JetStream pull consumer), and a revocation cuts the agent
    off (the gateway's revocation watcher)."""
    kept = await api.enroll(f"kept-{secrets.token_hex(3)}")
    killed = await api.enroll(f"killed-{secrets.token_hex(3)}")
    kept_proc, killed_proc = stack.start_agent(kept), stack.start_agent(killed)
    try:
        await api.wait_online(kept.id)
        await api.wait_online(killed.id)
        kept_session, killed_session = await api.open(kept.id), await api.open(killed.id)

        await restart_nats(nats_server)
        restarted = datetime.now().astimezone()
        await eventually(lambda: both_ready(stack), timeout_s=10, what="stack ready again")

        async def agent_heartbeat_seen() -> bool:
            seen = (await api.agent(kept.id))["last_seen_at"]
            return seen is not None and datetime.fromisoformat(seen) > restarted

        await eventually(agent_heartbeat_seen, timeout_s=5, what="agent heartbeat after restart")

        async def lease_renewed() -> bool:
            return await lease_renewed_at(stack) > restarted

        await eventually(lease_renewed, timeout_s=5, what="gateway lease renewed after restart")

        r = await api.client.post(
            f"/tunnel/{kept_session}/exec", json={"argv": ["echo", "after-restart"]}
        )
        assert r.status_code == 200, r.text
        assert (r.json()["stdout"], r.json()["reason"]) == ("after-restart\n", "exited")

        killed_at = time.monotonic()
        await asyncio.to_thread(killed_proc.kill)
        closed = await api.wait_closed(killed_session, timeout_s=5)
        assert closed["close_reason"] == "agent_disconnected", closed
        figure("nats_restart_agent_kill_to_closed_s", time.monotonic() - killed_at, "s")

        revoked_at = time.monotonic()
        r = await api.client.post(f"/agents/{kept.id}/revoke")
        assert r.status_code == 200, r.text

        async def agent_cut_off() -> bool:
            return not kept_proc.alive()

        # the agent exits 2 only when the gateway closes its socket 4501 (revoked): that close
        # comes from the revocation watch, which must have come back after the restart
        await eventually(agent_cut_off, timeout_s=5, what="revoked agent cut off by the gateway")
        assert kept_proc.proc is not None and kept_proc.proc.returncode == 2, kept_proc.log_tail()
        figure("nats_restart_revocation_to_cut_off_s", time.monotonic() - revoked_at, "s")
        assert (await api.session(kept_session))["close_reason"] == "revoked"
    finally:
        kept_proc.stop()
        killed_proc.stop()


async def test_nats_outage_past_the_lease_fails_readiness_closes_the_session_and_recovers(
    stack: Stack, nats_server: PrivateNats, api: Api, figure: Figure
) -> None:
    """NATS down longer than the gateway lease: /readyz of API and gateway answer 503 while
    /healthz stays 200, the session closes ``gateway_lost`` within lease TTL + reaper interval
    + 1 s, the technician's stream ends with ``session_closed``, an open and a revocation
    answer 503 ``bus_unavailable`` at once (an enrolment, which needs no bus, works); once NATS
    is back both are ready again, the revocation goes through and a new session works."""
    agent = await api.enroll(f"outage-{secrets.token_hex(3)}")
    proc = stack.start_agent(agent)
    try:
        await api.wait_online(agent.id)
        session_id = await api.open(agent.id)
        async with exec_stream(api, session_id, {"command": COUNTER_COMMAND}) as stream:
            await stream.wait_lines(5, timeout_s=10)
            await asyncio.to_thread(nats_server.kill)
            down_at = time.monotonic()

            async def unready() -> bool:
                api_ready = await status_of(f"{stack.api_url}/readyz")
                gateway_ready = await status_of(f"{gateway_url(stack)}/readyz")
                return api_ready == (503, "bus_unavailable") and gateway_ready[0] == 503

            await eventually(unready, timeout_s=5, what="readiness 503 on API and gateway")
            assert await status_of(f"{stack.api_url}/healthz") == (200, None)
            assert await status_of(f"{gateway_url(stack)}/healthz") == (200, None)

            closed = await api.wait_closed(session_id, timeout_s=LEASE_TTL_S + 5)
            close_s = time.monotonic() - down_at
            assert closed["close_reason"] == "gateway_lost", closed
            assert close_s <= LEASE_TTL_S + LEASE_REAP_INTERVAL_S + 1, close_s
            last = await stream.wait_end(timeout_s=5)
            assert (last["event"], last.get("code")) == ("error", "session_closed"), last
            stream_end_s = time.monotonic() - down_at

            # what needs the bus answers 503 at once, what needs only the database works
            asked = time.monotonic()
            r = await api.client.post("/tunnel/open", json={"agent_id": agent.id})
            assert (r.status_code, r.json()["error"]["code"]) == (503, "bus_unavailable")
            other = await api.enroll(f"enrolled-offline-{secrets.token_hex(3)}")
            r = await api.client.post(f"/agents/{other.id}/revoke")
            assert (r.status_code, r.json()["error"]["code"]) == (503, "bus_unavailable")
            assert time.monotonic() - asked <= 3 * REQUEST_TIMEOUT_S + 1
            assert silent_losses(stream.events) == 0

        await asyncio.to_thread(nats_server.start)
        ready_s = await eventually(
            lambda: both_ready(stack), timeout_s=10, what="API and gateway ready after the outage"
        )
        assert await status_of(f"{stack.api_url}/healthz") == (200, None)
        await api.wait_online(agent.id, timeout_s=10)
        r = await api.client.post(f"/agents/{other.id}/revoke")
        assert r.status_code == 200, r.text
        again = await api.open(agent.id)
        r = await api.client.post(f"/tunnel/{again}/exec", json={"argv": ["echo", "back"]})
        assert (r.status_code, r.json()["stdout"]) == (200, "back\n"), r.text
        figure("nats_outage_to_session_closed_s", close_s, "s")
        figure("nats_outage_to_stream_ended_s", stream_end_s, "s")
        figure("nats_back_to_ready_s", ready_s, "s")
    finally:
        proc.stop()


def _budget_api(stack: Stack, port: int) -> ManagedProcess:
    env = {
        **stack.api_environment(),
        "GT_API_PORT": str(port),
        "GT_API_NATS_MAX_RECONNECT_ATTEMPTS": "2",
    }
    proc = ManagedProcess(
        "api-budget",
        [executable("gurutunnel-api"), "serve", "--no-migrate"],
        env,
        stack.logs / "api-budget.log",
    ).start()
    stack.processes.append(proc)
    proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), timeout_s=30)
    return proc


async def test_nats_client_that_spent_its_reconnect_budget_fails_liveness_for_good(
    stack: Stack, nats_server: PrivateNats, api: Api
) -> None:
    """With a finite ``NATS_MAX_RECONNECT_ATTEMPTS`` an API and a gateway give up during an
    outage: from then on /healthz answers 503 as well as /readyz (Kubernetes' liveness probe
    restarts the pod; readiness alone would only take it out of the Service), and they stay so
    after NATS is back, while the default (-1: reconnect forever) processes recover. SIGTERM
    still ends them promptly."""
    port = free_port()
    budget_api = await asyncio.to_thread(_budget_api, stack, port)
    budget_gateway, gateway_port = await asyncio.to_thread(
        stack.start_gateway, "gwbudget", 30, None, GT_GATEWAY_NATS_MAX_RECONNECT_ATTEMPTS="2"
    )
    budget_urls = (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gateway_port}")
    try:
        await asyncio.to_thread(nats_server.kill)

        async def gave_up() -> bool:
            answers = [await status_of(f"{url}/healthz") for url in budget_urls]
            return all(status == 503 for status, _ in answers)

        await eventually(gave_up, timeout_s=10, what="liveness 503 once the budget is spent")
        assert await status_of(f"{budget_urls[0]}/healthz") == (503, "bus_unavailable")
        assert await status_of(f"{stack.api_url}/healthz") == (200, None)
        assert await status_of(f"{gateway_url(stack)}/healthz") == (200, None)

        await asyncio.to_thread(nats_server.start)
        await eventually(lambda: both_ready(stack), timeout_s=10, what="default clients back")
        deadline = time.monotonic() + 2.0  # ten reconnect waits: it does not come back
        while time.monotonic() < deadline:
            for url in budget_urls:
                assert (await status_of(f"{url}/readyz"))[0] == 503
                assert (await status_of(f"{url}/healthz"))[0] == 503
            await asyncio.sleep(0.2)
    finally:
        codes = []
        for proc in (budget_api, budget_gateway):
            stopped_at = time.monotonic()
            codes.append(await asyncio.to_thread(proc.stop, 10.0))
            assert time.monotonic() - stopped_at < 10, f"{proc.name} did not end on SIGTERM"
    # uvicorn re-raises the SIGTERM it handled once shut down: -15 is its clean exit
    assert codes == [-signal.SIGTERM, 0], [budget_api.log_tail(), budget_gateway.log_tail()]
