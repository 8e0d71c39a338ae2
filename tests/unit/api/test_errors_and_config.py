"""Error mapping and settings validation, without I/O."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gurutunnel_api.bus import AgentOffline, AgentRefused, AgentTimeout, BusUnavailable
from gurutunnel_api.config import ApiSettings
from gurutunnel_api.errors import bus_error_to_api, failure_for
from gurutunnel_protocol import ErrorCode


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (AgentOffline("a"), 409, ErrorCode.AGENT_OFFLINE),
        (AgentTimeout("a"), 504, ErrorCode.AGENT_TIMEOUT),
        (BusUnavailable("down"), 503, ErrorCode.BUS_UNAVAILABLE),
        (AgentRefused(ErrorCode.TUNNEL_BUSY, "busy"), 409, ErrorCode.AGENT_BUSY),
        (AgentRefused(ErrorCode.AGENT_OFFLINE, "gone"), 409, ErrorCode.AGENT_OFFLINE),
        (AgentRefused(ErrorCode.AGENT_TIMEOUT, "slow"), 504, ErrorCode.AGENT_TIMEOUT),
        (AgentRefused(ErrorCode.AGENT_BACKPRESSURE, "full"), 502, ErrorCode.AGENT_ERROR),
    ],
)
def test_bus_errors_map_to_documented_http_answers(
    exc: Exception, status: int, code: ErrorCode
) -> None:
    """Each bus failure becomes exactly one HTTP status and error code."""
    assert isinstance(exc, AgentOffline | AgentTimeout | BusUnavailable | AgentRefused)
    mapped = bus_error_to_api(exc)
    assert (mapped.status, mapped.code) == (status, code)


def test_settings_refuse_a_short_jwt_secret() -> None:
    """jwt_secret must have at least 32 characters."""
    with pytest.raises(ValidationError):
        ApiSettings(jwt_secret="short")


def test_settings_read_the_gt_api_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from GT_API_* variables, with the documented defaults."""
    monkeypatch.setenv("GT_API_JWT_SECRET", "k" * 40)
    monkeypatch.setenv("GT_API_OPEN_TIMEOUT_S", "2.5")
    settings = ApiSettings()
    assert settings.open_timeout_s == 2.5
    assert settings.port == 8080
    assert settings.subject_prefix == "gt"
    assert settings.jwt_ttl_s == 900
    assert settings.agent_credential_ttl_s == 365 * 24 * 3600


@pytest.mark.parametrize("code", list(ErrorCode))
def test_bus_errors_and_agent_tunnel_errors_share_one_failure_table(code: ErrorCode) -> None:
    """A code means the same close reason and HTTP answer whether a bus error or a
    tunnel.error carries it."""
    failure = failure_for(code)
    via_bus = bus_error_to_api(AgentRefused(code, "x"))
    via_table = failure.error()
    assert (via_bus.status, via_bus.code, via_bus.message) == (
        via_table.status,
        via_table.code,
        via_table.message,
    )
    assert failure.reason in {
        "agent_offline",
        "open_timeout",
        "bus_unavailable",
        "agent_busy",
        "agent_error",
    }
