"""Fault-test fixtures: private PostgreSQL clusters, compressed timings, measured figures.

The figures each test measures (time to close after a fault, orphans, clear-error share) are
printed in a "gurutunnel fault figures" section at the end of the run and, when
``GT_FAULT_FIGURES_FILE`` names a file, written there as JSON (the README's reliability section
quotes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.stack import Stack
from tests.support.faults import PostgresCluster, build_stack, create_admin
from tests.support.services import PostgresUnavailable

# Timings compressed so each fault plays out in seconds. The API judges a gateway lost
# LEASE_TTL_S after its last heartbeat; the reaper looks every 0.2 s.
LEASE_TTL_S = 3.0
LEASE_REAP_INTERVAL_S = 0.2

API_ENV = {
    "GT_API_OPEN_TIMEOUT_S": "3",
    "GT_API_CLOSE_TIMEOUT_S": "2",
    "GT_API_REQUEST_TIMEOUT_S": "1",
    "GT_API_NATS_RECONNECT_WAIT_S": "0.2",
    "GT_API_NATS_PING_INTERVAL_S": "1",
    "GT_API_PRESENCE_FETCH_TIMEOUT_S": "0.5",
    "GT_API_PRESENCE_NAK_DELAY_S": "0.2",
    "GT_API_PRESENCE_CHECK_INTERVAL_S": "1",
    "GT_API_PRESENCE_RESUBSCRIBE_BACKOFF_MAX_S": "1",
    "GT_API_LEASE_REAP_INTERVAL_S": str(LEASE_REAP_INTERVAL_S),
    "GT_API_SESSION_WATCH_INTERVAL_S": "0.2",
    "GT_API_EXEC_CLOSE_GRACE_S": "1",
    "GT_API_EXEC_START_TIMEOUT_S": "3",
    "GT_API_SHUTDOWN_GRACE_S": "2",
}
GATEWAY_ENV = {
    "GT_GATEWAY_PING_INTERVAL_S": "1",
    "GT_GATEWAY_PING_TIMEOUT_S": "1",
    "GT_GATEWAY_HEARTBEAT_INTERVAL_S": "0.3",
    "GT_GATEWAY_HEARTBEAT_TIMEOUT_S": "0.5",
    "GT_GATEWAY_LEASE_TTL_S": str(LEASE_TTL_S),
    "GT_GATEWAY_NATS_RECONNECT_WAIT_S": "0.2",
    "GT_GATEWAY_NATS_PING_INTERVAL_S": "1",
    "GT_GATEWAY_PUBLISH_TIMEOUT_S": "2",
    "GT_GATEWAY_PRESENCE_RETRY_WAIT_S": "0.2",
    "GT_GATEWAY_DRAIN_TIMEOUT_S": "3",
    "GT_GATEWAY_RECONNECT_JITTER_MAX_S": "0.2",
}
AGENT_ENV = {
    "GT_AGENT_HEARTBEAT_INTERVAL_S": "0.5",
    "GT_AGENT_BACKOFF_INITIAL_S": "0.1",
    "GT_AGENT_BACKOFF_MAX_S": "0.5",
}

Figure = Callable[[str, float, str], None]
_FIGURES = pytest.StashKey[list[dict[str, object]]]()


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Figure:
    """``figure(name, value, unit)`` records one measured figure of this test."""

    def record(name: str, value: float, unit: str) -> None:
        rows = request.config.stash.setdefault(_FIGURES, [])
        rows.append(
            {"test": request.node.name, "figure": name, "value": round(value, 3), "unit": unit}
        )
        request.node.user_properties.append((name, f"{value:.3f} {unit}"))

    return record


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    rows = config.stash.get(_FIGURES, [])
    if not rows:
        return
    terminalreporter.section("gurutunnel fault figures")
    for row in rows:
        terminalreporter.write_line(
            f"{row['figure']}: {row['value']} {row['unit']}  ({row['test']})"
        )
    path = os.environ.get("GT_FAULT_FIGURES_FILE")
    if path:
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=2)


@pytest.fixture(scope="module")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this module's own, which its tests stop, pause and restart
    (never the machine's shared server). Skipped with the reason where the binaries are
    missing, failed instead under ``GT_REQUIRE_POSTGRES=1``."""
    cluster: PostgresCluster | None = None
    try:
        cluster = PostgresCluster()
        cluster.init()
    except PostgresUnavailable as exc:
        if cluster is not None:
            cluster.cleanup()
        if os.environ.get("GT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required (GT_REQUIRE_POSTGRES=1) but unavailable: {exc}")
        pytest.skip(f"no private PostgreSQL cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.cleanup()


@contextlib.contextmanager
def running_stack(
    root: Path,
    *,
    nats_url: str,
    database_url: str | None,
    prefix: str,
    admin: str,
    password: str,
) -> Iterator[Stack]:
    """The fault tests' stack with their compressed timings: the API, one gateway and an admin
    (``admin``/``password``) on a subject prefix of its own; every process stopped after."""
    s = build_stack(
        root,
        nats_url=nats_url,
        database_url=database_url,
        subject_prefix=f"{prefix}{secrets.token_hex(4)}.gt",
        api_env=API_ENV,
        gateway_env=GATEWAY_ENV,
        agent_env=AGENT_ENV,
    )
    try:
        s.start_api()
        s.start_gateway()
        asyncio.run(create_admin(s, admin, password))
        yield s
    finally:
        s.close()
