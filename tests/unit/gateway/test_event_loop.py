"""The gateway's event loop choice: uvloop where installed, asyncio on request."""

from __future__ import annotations

import asyncio

import pytest

from gurutunnel_gateway.config import GatewaySettings
from gurutunnel_gateway.server import event_loop_factory


def test_asyncio_choice_uses_asyncio_own_loop() -> None:
    """``asyncio`` gives no factory: asyncio.Runner makes its default loop."""
    assert event_loop_factory("asyncio") is None


def test_auto_choice_runs_on_uvloop_when_installed() -> None:
    """``auto`` returns uvloop's loop factory where uvloop is installed."""
    uvloop = pytest.importorskip("uvloop")
    factory = event_loop_factory("auto")
    assert factory is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)


def test_event_loop_setting_defaults_to_auto_and_refuses_others() -> None:
    """GT_GATEWAY_EVENT_LOOP is auto by default; an unknown value is a settings error."""
    assert GatewaySettings(agent_public_key="x").event_loop == "auto"
    with pytest.raises(ValueError, match="event_loop"):
        GatewaySettings(agent_public_key="x", event_loop="trio")
