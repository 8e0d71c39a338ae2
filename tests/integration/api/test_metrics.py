"""``GET /metrics`` of the API: real NATS, SQLite and PostgreSQL, a fake gateway on the bus;
the exposition parsed with ``prometheus_client``'s own parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gurutunnel_api.config import ApiSettings
from gurutunnel_api.metrics import ApiMetrics
from gurutunnel_protocol.messages import SessionFrame, Terminal
from tests.support.services import NatsProcess, free_port

from .conftest import (
    JWT_SECRET,
    Api,
    EnrolledAgent,
    FakeGateway,
    Presence,
    Users,
    chunk,
    exit_frame,
    running_api,
    wait_until,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

DURATION = "gurutunnel_api_http_request_duration_seconds"
COMMAND_TEXT = "cat /etc/very-secret-command-text"


async def scrape(api: Api) -> tuple[str, Samples]:
    """The raw exposition and its samples by (name, labels); parsing fails on a bad format."""
    resp = await api.client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return resp.text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def requests(samples: Samples, method: str, route: str, status_class: str) -> float:
    """How many requests the histogram counted for these labels (0 when none)."""
    labels = {"method": method, "route": route, "status_class": status_class}
    return value(samples, DURATION + "_count", **labels) or 0.0


async def test_metrics_after_an_open_and_a_command_show_states_routes_and_outcomes_without_ids(
    api: Api, users: Users, agent: EnrolledAgent, gateway: FakeGateway, presence: Presence
) -> None:
    """Sessions by state and online agents come from the database, requests are timed by route
    template, opens/commands/presence are counted by outcome; no id, token or command text."""

    async def on_terminal(t: Terminal) -> list[SessionFrame]:
        return [chunk(t, 0, b"hello\n"), exit_frame(t, 1, stdout_bytes=6)]

    gateway.on_terminal = on_terminal
    await presence.send(gateway.connected())
    opened = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert opened.status_code == 201, opened.text
    session_id = opened.json()["id"]
    again = await api.client.post(
        "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
    )
    assert again.status_code == 409
    status = await api.client.get(
        f"/api/v1/tunnel/status/{session_id}", headers=users.viewer.headers
    )
    assert status.status_code == 200
    ran = await api.client.post(
        f"/api/v1/tunnel/{session_id}/exec",
        json={"command": COMMAND_TEXT, "timeout_s": 5},
        headers=users.tech.headers,
    )
    assert ran.status_code == 200, ran.text
    assert ran.json()["reason"] == "exited"

    text, samples = await scrape(api)
    assert value(samples, "gurutunnel_api_database_up") == 1
    assert value(samples, "gurutunnel_api_sessions", state="active") == 1
    for state in ("pending", "closed", "failed"):
        assert value(samples, "gurutunnel_api_sessions", state=state) == 0
    assert value(samples, "gurutunnel_api_agents_connected") == 1
    assert requests(samples, "POST", "/api/v1/tunnel/open", "2xx") == 1
    assert requests(samples, "POST", "/api/v1/tunnel/open", "4xx") == 1
    assert requests(samples, "GET", "/api/v1/tunnel/status/{session_id}", "2xx") == 1
    assert requests(samples, "POST", "/api/v1/tunnel/{session_id}/exec", "2xx") == 1
    assert value(samples, "gurutunnel_api_tunnel_opens_total", outcome="opened") == 1
    assert value(samples, "gurutunnel_api_tunnel_opens_total", outcome="session_exists") == 1
    assert value(samples, "gurutunnel_api_commands_total", outcome="exited") == 1
    handled = {"kind": "presence.connected", "outcome": "handled"}
    assert value(samples, "gurutunnel_api_presence_events_total", **handled) == 1
    assert value(samples, "gurutunnel_api_nats_reconnects_total") == 0
    assert value(samples, "gurutunnel_api_gateway_leases_lost_total") == 0
    secrets = [session_id, agent.id, agent.credential, COMMAND_TEXT, gateway.conn_id]
    for user in (users.tech, users.viewer, users.admin):
        secrets += [user.id, user.token]
    for secret in secrets:
        assert secret not in text

    closed = await api.client.post(
        "/api/v1/tunnel/close", json={"session_id": session_id}, headers=users.tech.headers
    )
    assert closed.status_code == 200
    _, after = await scrape(api)
    assert value(after, "gurutunnel_api_sessions", state="active") == 0
    assert value(after, "gurutunnel_api_sessions", state="closed") == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_unmatched_paths_and_odd_methods_get_fixed_labels(api: Api, users: Users) -> None:
    """A path no route matches is ``unmatched`` and an unknown method ``other``: the label set
    stays closed whatever a client sends; a 404 on a known route keeps its template."""
    raw_id = "raw0id0that0must0not0show"
    assert (await api.client.get(f"/nope/{raw_id}")).status_code == 404
    assert (await api.client.request("BREW", f"/api/v1/tunnel/status/{raw_id}")).status_code == 405
    missing = await api.client.get(f"/api/v1/tunnel/status/{raw_id}", headers=users.viewer.headers)
    assert missing.status_code == 404
    text, samples = await scrape(api)
    assert requests(samples, "GET", "unmatched", "4xx") == 1
    assert requests(samples, "other", "/api/v1/tunnel/status/{session_id}", "4xx") == 1
    assert requests(samples, "GET", "/api/v1/tunnel/status/{session_id}", "4xx") == 1
    assert raw_id not in text
    assert "/metrics" not in (await api.client.get("/openapi.json")).text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_two_apps_in_one_process_keep_their_own_registries(
    migrated: ApiSettings, nc: object
) -> None:
    """Two apps (and a third ApiMetrics) in one process: no duplicate registration, and the
    requests of one never show in the other."""
    ApiMetrics()
    async with running_api(migrated) as first, running_api(migrated) as second:
        for _ in range(3):
            assert (await first.client.get("/healthz")).status_code == 200
        _, one = await scrape(first)
        _, two = await scrape(second)
    assert requests(one, "GET", "/healthz", "2xx") == 3
    assert requests(two, "GET", "/healthz", "2xx") == 0


async def test_metrics_answer_with_database_up_0_when_the_database_is_gone(
    nats_url: str, subject_prefix: str, nc: object
) -> None:
    """No database: /metrics still answers (bounded by request_timeout_s), database_up is 0 and
    the database-derived series are left out rather than stale."""
    settings = ApiSettings(
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing",
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        jwt_secret=JWT_SECRET,
        request_timeout_s=1.0,
    )
    async with running_api(settings) as api:
        text, samples = await scrape(api)
    assert value(samples, "gurutunnel_api_database_up") == 0
    assert "gurutunnel_api_sessions" not in text
    assert "gurutunnel_api_agents_connected" not in text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_nats_reconnect_is_counted_once_the_server_is_back(migrated: ApiSettings) -> None:
    """A NATS restart under a running API shows as one reconnect."""
    server = NatsProcess()
    server.start()
    try:
        settings = migrated.model_copy(
            update={"nats_url": server.url, "nats_reconnect_wait_s": 0.1}
        )
        async with running_api(settings) as api:
            server.stop()
            server.start()  # same port and JetStream directory

            async def reconnected() -> bool:
                _, samples = await scrape(api)
                return value(samples, "gurutunnel_api_nats_reconnects_total") == 1

            await wait_until(reconnected, what="one NATS reconnect counted")
    finally:
        server.cleanup()
