"""Unit tests of the reconnect backoff, the JSON log format and secret redaction."""

from __future__ import annotations

import io
import json
import logging
import random

import pytest

from gurutunnel_agent.client import Backoff
from gurutunnel_agent.logs import redact, setup_logging
from gurutunnel_agent.metrics import collect_host_metrics


def test_backoff_grows_exponentially_up_to_the_cap_without_jitter() -> None:
    """Without jitter the delays are initial * factor**n, capped at max_s."""
    b = Backoff(1.0, 10.0, 2.0, jitter=False)
    assert [b.next_delay() for _ in range(6)] == [1, 2, 4, 8, 10, 10]


def test_backoff_full_jitter_stays_within_the_ceiling_and_resets() -> None:
    """With full jitter each delay is in [0, ceiling]; reset starts again from initial_s."""
    b = Backoff(1.0, 8.0, 2.0, rng=random.Random(7))
    ceilings = [1, 2, 4, 8, 8, 8]
    delays = [b.next_delay() for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # actually random, not a fixed schedule
    b.reset()
    assert b.next_delay() <= 1.0


def test_backoff_survives_a_very_long_outage() -> None:
    """After thousands of attempts the delay is still the cap (no overflow)."""
    b = Backoff(1.0, 60.0, 2.0, jitter=False)
    for _ in range(5000):
        delay = b.next_delay()
    assert delay == 60.0


def test_redact_blanks_bearer_tokens_and_jwts() -> None:
    """Bearer values and JWT-shaped strings never survive into a log line."""
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.sig_-"
    out = redact(f"> Authorization: Bearer abc.def and {jwt}")
    assert "abc.def" not in out
    assert jwt not in out
    assert "Bearer [redacted]" in out


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield None
    root.handlers[:], level = saved
    root.setLevel(level)


def test_log_lines_are_json_with_extras_and_redacted(restore_logging: object) -> None:
    """One JSON object per line carrying extra fields; a leaked bearer token is blanked."""
    stream = io.StringIO()
    setup_logging("INFO", stream)
    logging.getLogger("gurutunnel_agent.test").info(
        "hello Bearer s3cret", extra={"session_id": "s1", "close_code": 1000}
    )
    entry = json.loads(stream.getvalue().strip())
    assert entry["msg"] == "hello Bearer [redacted]"
    assert (entry["level"], entry["session_id"], entry["close_code"]) == ("info", "s1", 1000)
    assert logging.getLogger("websockets").getEffectiveLevel() >= logging.INFO


def test_host_metrics_are_a_valid_snapshot() -> None:
    """collect_host_metrics returns in-range values for this machine."""
    m = collect_host_metrics()
    assert m.cpu_count >= 1
    assert 0 <= m.mem_used_percent <= 100
    assert m.disk_total_bytes > 0
    assert m.boot_time.tzinfo is not None
