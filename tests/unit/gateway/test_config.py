"""Gateway settings: environment prefix, required key, id validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gurutunnel_gateway.config import GatewaySettings
from tests.integration.gateway.credentials import generate_agent_key


def test_settings_read_gt_gateway_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """GT_GATEWAY_* variables configure the gateway; the PEM text is accepted inline."""
    _, pem = generate_agent_key()
    monkeypatch.setenv("GT_GATEWAY_AGENT_PUBLIC_KEY", pem)
    monkeypatch.setenv("GT_GATEWAY_PORT", "9999")
    monkeypatch.setenv("GT_GATEWAY_MAX_FRAME_BYTES", "2048")
    settings = GatewaySettings()
    assert (settings.port, settings.max_frame_bytes) == (9999, 2048)
    assert settings.public_key_pem() == pem


def test_missing_public_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a public key the settings refuse to build and name both variables."""
    monkeypatch.delenv("GT_GATEWAY_AGENT_PUBLIC_KEY", raising=False)
    monkeypatch.delenv("GT_GATEWAY_AGENT_PUBLIC_KEY_FILE", raising=False)
    with pytest.raises(ValidationError, match="GT_GATEWAY_AGENT_PUBLIC_KEY_FILE"):
        GatewaySettings()


@pytest.mark.parametrize(("field", "value"), [("gateway_id", "a.b"), ("subject_prefix", "gt.*")])
def test_unsafe_ids_are_refused(field: str, value: str) -> None:
    """A gateway id or prefix that could break a subject is refused."""
    _, pem = generate_agent_key()
    with pytest.raises(ValidationError):
        GatewaySettings.model_validate({"agent_public_key": pem, field: value})
