"""The agent's gateway list and its reconnect spreading: pure rules, no sockets."""

from __future__ import annotations

import os
import random
from typing import Any, cast

import pytest
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection

from gurutunnel_agent.client import AgentClient, Backoff, _Connection
from gurutunnel_agent.config import AgentSettings, load_settings
from gurutunnel_protocol import CloseCode
from gurutunnel_protocol.messages import Welcome

A = "ws://a.example:8081/agent/v1/connect"
B = "wss://b.example/agent/v1/connect"
C = "ws://c.example:8081/agent/v1/connect"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GT_AGENT_"):
            monkeypatch.delenv(name)


def settings(**values: Any) -> AgentSettings:
    return AgentSettings(**{"gateway_url": A, "credential": "c", **values})


def test_connect_urls_are_gateway_url_then_the_others_without_repeats() -> None:
    """gateway_url comes first; gateway_urls follow in order, duplicates dropped."""
    assert settings().connect_urls == [A]
    assert settings(gateway_urls=[B, A, C, B]).connect_urls == [A, B, C]


def test_gateway_urls_come_from_a_json_list_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GT_AGENT_GATEWAY_URLS is a JSON list."""
    monkeypatch.setenv("GT_AGENT_GATEWAY_URL", A)
    monkeypatch.setenv("GT_AGENT_GATEWAY_URLS", f'["{B}", "{C}"]')
    monkeypatch.setenv("GT_AGENT_CREDENTIAL", "c")
    assert load_settings().connect_urls == [A, B, C]


@pytest.mark.parametrize(
    ("url", "message"),
    [("http://b.example/x", "ws:// or wss://"), ("ws://u:p@b.example/x", "user info")],
)
def test_every_failover_url_is_checked_like_gateway_url(url: str, message: str) -> None:
    """A failover URL that is not ws(s):// or carries user info is refused."""
    with pytest.raises(ValidationError, match=message):
        settings(gateway_urls=[B, url])


def client(**values: Any) -> AgentClient:
    return AgentClient(settings(**values), rng=random.Random(1))


def ended(
    *,
    welcomed: bool = True,
    reconnect_delay_s: float | None = None,
    close_code: int | None = None,
) -> _Connection:
    conn = _Connection(ws=cast(ClientConnection, None), opened_at=0.0)
    if welcomed:
        conn.welcome = Welcome(agent_id="a", conn_id="c", gateway_id="g", heartbeat_interval_s=1)
    conn.reconnect_delay_s = reconnect_delay_s
    conn.close_code = close_code
    return conn


def test_failed_attempts_walk_the_list_round_robin() -> None:
    """No connection, or no welcome: the next attempt goes to the next URL, wrapping around."""
    agent = client(gateway_urls=[B, C])
    seen = [agent.gateway_url]
    for conn in (None, ended(welcomed=False), None):
        agent._next_url(conn)
        seen.append(agent.gateway_url)
    assert seen == [A, B, C, A]


@pytest.mark.parametrize(
    "conn",
    [
        ended(reconnect_delay_s=0.5),
        ended(close_code=CloseCode.DRAINING),
        ended(close_code=CloseCode.LEASE_LOST),
    ],
    ids=["reconnect-frame", "draining", "lease-lost"],
)
def test_gateway_going_away_moves_to_the_next_url(conn: _Connection) -> None:
    """A gateway that said it is going away is not the first one tried again."""
    agent = client(gateway_urls=[B])
    agent._next_url(conn)
    assert agent.gateway_url == B


@pytest.mark.parametrize(
    "code", [CloseCode.NORMAL, CloseCode.REPLACED, CloseCode.INTERNAL_ERROR, None]
)
def test_working_connection_that_dropped_retries_the_same_url(code: int | None) -> None:
    """A welcomed connection that ended otherwise (blip, replaced, 1006) keeps its URL."""
    agent = client(gateway_urls=[B])
    agent._next_url(ended(close_code=code))
    assert agent.gateway_url == A


def test_reconnect_hint_gets_the_agents_own_jitter_on_top() -> None:
    """reconnect{delay_ms}: the wait is max(hint, backoff) plus up to reconnect_jitter_s, and
    agents told the same delay spread over that range instead of reconnecting together."""
    agent = client(reconnect_jitter_s=1.0, backoff_initial_s=0.1, backoff_max_s=10)
    waits = []
    for _ in range(200):  # 200 agents, each on its first reconnect after the same hint
        backoff = Backoff(0.1, 10.0, 2.0, jitter=False)  # 0.1 s: below the hint
        waits.append(agent._reconnect_delay(ended(reconnect_delay_s=2.0), backoff))
    assert all(2.0 <= w <= 3.0 for w in waits)
    assert max(waits) - min(waits) > 0.8  # spread over (almost) the whole jitter range
    assert len({round(w, 3) for w in waits}) > 150


def test_reconnect_hint_is_capped_at_backoff_max_before_the_jitter() -> None:
    """A hint of hours waits at most backoff_max_s plus the jitter."""
    agent = client(reconnect_jitter_s=0.5, backoff_max_s=3)
    backoff = Backoff(0.1, 3.0, 2.0, jitter=False)
    wait = agent._reconnect_delay(ended(reconnect_delay_s=36000.0), backoff)
    assert 3.0 <= wait <= 3.5
