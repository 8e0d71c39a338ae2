"""The example settings in deploy/env name real settings and load as they are."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from gurutunnel_agent.config import AgentSettings, load_settings
from gurutunnel_api.config import ApiSettings
from gurutunnel_gateway.config import GatewaySettings

ENV = Path(__file__).resolve().parents[2] / "deploy" / "env"


def _keys(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


@pytest.mark.parametrize(
    ("example", "settings", "prefix"),
    [
        ("api.env.example", ApiSettings, "GT_API_"),
        ("gateway.env.example", GatewaySettings, "GT_GATEWAY_"),
    ],
)
def test_env_examples_name_only_real_settings(
    example: str, settings: type[BaseSettings], prefix: str
) -> None:
    """Every variable in an env example is a field of that service's settings class."""
    keys = _keys(ENV / example)
    assert keys
    fields = {f"{prefix}{name.upper()}" for name in settings.model_fields}
    assert set(keys) <= fields, sorted(set(keys) - fields)


def test_agent_toml_example_loads(tmp_path: Path) -> None:
    """The agent's example file is a valid configuration once its credential file exists."""
    credential = tmp_path / "agent.credential"
    credential.write_text("token")
    text = (
        (ENV / "agent.toml.example")
        .read_text()
        .replace("/etc/gurutunnel/agent.credential", str(credential))
    )
    config = tmp_path / "agent.toml"
    config.write_text(text)
    settings = load_settings(config_file=config)
    assert isinstance(settings, AgentSettings)
    assert settings.gateway_url.startswith("wss://")
