"""PostgreSQL faults under a real stack: stopped, paused (SIGSTOP), restarted.

A cluster of this module's own (``initdb``/``pg_ctl``), the real ``gurutunnel-api serve`` on it,
a real gateway and agents on the suite's NATS (a subject prefix of this module's own). While
the database is gone every request that needs it answers 503 ``database_unavailable`` within a
bound (never a 500, never a hang), readiness fails while liveness holds, a disconnect that
arrives meanwhile is redelivered until it is handled, and the API recovers by itself.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from devstack.processes import ManagedProcess
from devstack.stack import Stack
from tests.support.faults import (
    Api,
    PostgresCluster,
    eventually,
    status_of,
)

from .conftest import API_ENV, LEASE_TTL_S, Figure, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ADMIN = "admin"
PASSWORD = secrets.token_urlsafe(16)
REQUEST_TIMEOUT_S = float(API_ENV["GT_API_REQUEST_TIMEOUT_S"])
# a request that needs the database may wait on a pool checkout, a connection attempt and one
# statement, each bounded by GT_API_REQUEST_TIMEOUT_S; one more second for the process itself
ANSWER_BOUND_S = 3 * REQUEST_TIMEOUT_S + 1
OUTAGE_S = LEASE_TTL_S + 1.0  # longer than a gateway lease: heartbeats cannot be recorded


@pytest.fixture(scope="module")
def stack(
    postgres_cluster: PostgresCluster, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    database_url = asyncio.run(postgres_cluster.create_database("gurutunnel"))
    with running_stack(
        tmp_path_factory.mktemp("pg-faults"),
        nats_url=nats_url,
        database_url=database_url,
        prefix="p",
        admin=ADMIN,
        password=PASSWORD,
    ) as s:
        yield s


@pytest.fixture
async def api(stack: Stack, postgres_cluster: PostgresCluster) -> AsyncIterator[Api]:
    """An admin client once the database answers and the API is ready again."""
    postgres_cluster.resume()
    await eventually(lambda: _ready(f"{stack.api_url}/readyz"), timeout_s=15, what="API ready")
    async with Api.login(stack, ADMIN, PASSWORD) as client:
        yield client


async def _ready(url: str) -> bool:
    return (await status_of(url))[0] == 200


@dataclass(frozen=True)
class Answer:
    what: str
    status: int | None
    code: str | None
    seconds: float

    @property
    def clear(self) -> bool:
        """The documented answer to "the database does not answer"."""
        return self.status == 503 and self.code == "database_unavailable"


async def _call(api: Api, what: str, method: str, path: str, body: object = None) -> Answer:
    started = time.monotonic()
    try:
        r = await api.client.request(method, path, json=body, timeout=ANSWER_BOUND_S + 5)
    except httpx.HTTPError as exc:
        return Answer(what, None, type(exc).__name__, time.monotonic() - started)
    code = None
    if r.status_code >= 400:
        code = r.json().get("error", {}).get("code")
    return Answer(what, r.status_code, code, time.monotonic() - started)


async def probe(api: Api, session_id: str, agent_id: str) -> list[Answer]:
    """One round of requests that all need the database, sent at once."""
    calls = [
        _call(api, "list agents", "GET", "/agents"),
        _call(api, "read agent", "GET", f"/agents/{agent_id}"),
        _call(api, "session status", "GET", f"/tunnel/status/{session_id}"),
        _call(api, "list sessions", "GET", "/tunnel/sessions"),
        _call(api, "open", "POST", "/tunnel/open", {"agent_id": agent_id}),
        _call(api, "exec", "POST", f"/tunnel/{session_id}/exec", {"argv": ["true"]}),
        _call(api, "close", "POST", "/tunnel/close", {"session_id": session_id}),
        _call(api, "login", "POST", "/auth/token", {"username": ADMIN, "password": PASSWORD}),
        _call(api, "audit", "GET", "/audit"),
    ]
    return list(await asyncio.gather(*calls))


async def _session_with_agent(api: Api, stack: Stack, name: str) -> tuple[str, str, ManagedProcess]:
    agent = await api.enroll(f"{name}-{secrets.token_hex(3)}")
    proc = stack.start_agent(agent)
    await api.wait_online(agent.id)
    return agent.id, await api.open(agent.id), proc


async def _outage(
    api: Api, stack: Stack, session_id: str, agent_id: str, *, seconds: float
) -> list[Answer]:
    """Probe again and again for ``seconds``; readiness must fail and liveness hold throughout."""
    answers: list[Answer] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answers += await probe(api, session_id, agent_id)
        assert await status_of(f"{stack.api_url}/readyz", timeout_s=ANSWER_BOUND_S) == (
            503,
            "database_unavailable",
        )
        assert await status_of(f"{stack.api_url}/healthz") == (200, None)
    return answers


def _report(figure: Figure, prefix: str, answers: list[Answer]) -> None:
    clear = sum(a.clear for a in answers)
    figure(f"{prefix}_clear_errors_share", 100.0 * clear / len(answers), "%")
    figure(f"{prefix}_requests", len(answers), "requests")
    figure(f"{prefix}_slowest_answer_s", max(a.seconds for a in answers), "s")


async def test_stopped_database_answers_503_and_the_api_catches_up_on_its_return(
    stack: Stack, postgres_cluster: PostgresCluster, api: Api, figure: Figure
) -> None:
    """PostgreSQL stopped for longer than a gateway lease: every request that needs it answers
    503 ``database_unavailable`` within the bound, /readyz 503 and /healthz 200; an agent that
    dies meanwhile has its disconnect redelivered until the database is back, then its session
    closes ``agent_disconnected``; a session on a live agent stays active and works."""
    gone_id, gone_session, gone_proc = await _session_with_agent(api, stack, "gone")
    kept_id, kept_session, kept_proc = await _session_with_agent(api, stack, "kept")
    try:
        await asyncio.to_thread(postgres_cluster.stop)
        await asyncio.to_thread(gone_proc.kill)
        answers = await _outage(api, stack, gone_session, gone_id, seconds=OUTAGE_S)
        await asyncio.to_thread(postgres_cluster.start)
        back_at = time.monotonic()
        ready_s = await eventually(
            lambda: _ready(f"{stack.api_url}/readyz"), timeout_s=10, what="API ready again"
        )
        closed = await api.wait_closed(gone_session, timeout_s=10)
        closed_s = time.monotonic() - back_at

        assert [a for a in answers if not a.clear] == []
        assert max(a.seconds for a in answers) <= ANSWER_BOUND_S
        assert closed["close_reason"] == "agent_disconnected", closed
        kept = await api.session(kept_session)
        assert (kept["state"], kept["close_reason"]) == ("active", None), kept
        r = await api.client.post(f"/tunnel/{kept_session}/exec", json={"argv": ["echo", "ok"]})
        assert (r.status_code, r.json()["stdout"]) == (200, "ok\n"), r.text
        assert (await api.agent(kept_id))["online"] is True
        _report(figure, "pg_stopped", answers)
        figure("pg_back_to_ready_s", ready_s, "s")
        figure("pg_back_to_disconnect_handled_s", closed_s, "s")
    finally:
        gone_proc.stop()
        kept_proc.stop()


async def test_paused_database_answers_503_within_the_bound_and_recovers_on_sigcont(
    stack: Stack, postgres_cluster: PostgresCluster, api: Api, figure: Figure
) -> None:
    """PostgreSQL frozen (SIGSTOP of postmaster and backends: connections hang instead of being
    refused): requests still answer 503 ``database_unavailable`` within the bound, never hang;
    after SIGCONT the API recovers without a restart and the disconnect of an agent that died
    meanwhile closes its session; the live agent's session stays active."""
    gone_id, gone_session, gone_proc = await _session_with_agent(api, stack, "frozen")
    kept_id, kept_session, kept_proc = await _session_with_agent(api, stack, "thawed")
    try:
        paused = await asyncio.to_thread(postgres_cluster.pause)
        assert paused >= 2  # the postmaster and at least one pooled backend
        await asyncio.to_thread(gone_proc.kill)
        answers = await _outage(api, stack, gone_session, gone_id, seconds=OUTAGE_S)
        await asyncio.to_thread(postgres_cluster.resume)
        back_at = time.monotonic()
        ready_s = await eventually(
            lambda: _ready(f"{stack.api_url}/readyz"), timeout_s=10, what="API ready again"
        )
        closed = await api.wait_closed(gone_session, timeout_s=10)
        closed_s = time.monotonic() - back_at

        assert [a for a in answers if not a.clear] == []
        assert max(a.seconds for a in answers) <= ANSWER_BOUND_S
        assert closed["close_reason"] == "agent_disconnected", closed
        kept = await api.session(kept_session)
        assert (kept["state"], kept["close_reason"]) == ("active", None), kept
        r = await api.client.post(f"/tunnel/{kept_session}/exec", json={"argv": ["echo", "ok"]})
        assert (r.status_code, r.json()["stdout"]) == (200, "ok\n"), r.text
        assert (await api.agent(kept_id))["online"] is True
        _report(figure, "pg_paused", answers)
        figure("pg_sigcont_to_ready_s", ready_s, "s")
        figure("pg_sigcont_to_disconnect_handled_s", closed_s, "s")
    finally:
        await asyncio.to_thread(postgres_cluster.resume)
        gone_proc.stop()
        kept_proc.stop()


async def test_database_restart_between_requests_is_invisible_once_it_is_back(
    stack: Stack, postgres_cluster: PostgresCluster, api: Api, figure: Figure
) -> None:
    """``pg_ctl restart`` kills every pooled connection: requests during the restart answer 200
    or 503 ``database_unavailable``, and the very first ones after it answer 200 (pre-ping
    replaces the dead connections), never a 500."""
    agent_id, session_id, proc = await _session_with_agent(api, stack, "restart")
    try:
        before = await probe(api, session_id, agent_id)
        assert all(a.status is not None and a.status < 500 for a in before), before
        restarted = asyncio.Event()
        during = asyncio.create_task(_probe_until(api, session_id, agent_id, restarted.is_set))
        started = time.monotonic()
        await asyncio.to_thread(postgres_cluster.restart)
        restart_s = time.monotonic() - started
        restarted.set()
        answers = await during
        after = await probe(api, session_id, agent_id)

        assert [a for a in answers if a.status != 200 and not a.clear] == [], answers
        # "open" is 409 (the agent has its session), "close" 200: no 5xx once it is back
        assert [(a.what, a.status) for a in after if a.status is None or a.status >= 500] == []
        figure("pg_restart_s", restart_s, "s")
        figure("pg_restart_requests", len(answers), "requests")
        figure(
            "pg_restart_clear_or_ok_share",
            100.0 * sum(a.status == 200 or a.clear for a in answers) / max(len(answers), 1),
            "%",
        )
    finally:
        proc.stop()


async def _probe_until(
    api: Api, session_id: str, agent_id: str, done: Callable[[], bool]
) -> list[Answer]:
    answers: list[Answer] = []
    while not done():
        round_ = [
            await _call(api, "list agents", "GET", "/agents"),
            await _call(api, "session status", "GET", f"/tunnel/status/{session_id}"),
        ]
        answers += round_
    return answers
