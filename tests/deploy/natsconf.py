"""NATS server configuration from ``deploy/k8s/nats/values.yaml``, rendered as the chart does.

The official chart writes ``nats.conf`` as JSON and unwraps ``"<< X >>"`` strings into bare NATS
config tokens (``$VAR`` references, units such as ``2MB``); :func:`render` does the same, so the
users and permissions a test runs a real ``nats-server`` with are exactly those of the values file.
The compose deployment's ``deploy/compose/nats.conf`` is this rendering with the compose
server block (:func:`compose_config`); regenerate it with::

    .venv/bin/python -m tests.deploy.natsconf > deploy/compose/nats.conf

``tests/deploy/test_nats_permissions.py`` fails when the committed file differs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "deploy" / "k8s" / "nats" / "values.yaml"
COMPOSE_CONF = ROOT / "deploy" / "compose" / "nats.conf"

_UNWRAP = re.compile(r'"<< (.+?) >>"')

COMPOSE_HEADER = """\
# NATS configuration of the compose deployment: JetStream, and the accounts, users and
# permissions of deploy/k8s/nats/values.yaml (config.merge). Generated, do not edit:
#   .venv/bin/python -m tests.deploy.natsconf > deploy/compose/nats.conf
# The passwords are environment variables of the nats service (deploy/compose/.env).
"""


def values() -> dict[str, Any]:
    """The chart values file, parsed."""
    loaded: dict[str, Any] = yaml.safe_load(VALUES.read_text())
    return loaded


def merge_section(chart_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.merge``: what the values add to the chart's own server configuration."""
    merged: dict[str, Any] = (chart_values or values())["config"]["merge"]
    return merged


def render(config: dict[str, Any]) -> str:
    """NATS config text: JSON with ``"<< X >>"`` unwrapped to ``X`` (the chart's convention)."""
    return _UNWRAP.sub(r"\1", json.dumps(config, indent=2)) + "\n"


def server_config(server: dict[str, Any], chart_values: dict[str, Any] | None = None) -> str:
    """A whole server configuration: ``server`` (listen, JetStream...) plus ``config.merge``."""
    return render({**server, **merge_section(chart_values)})


def compose_config() -> str:
    """The expected text of ``deploy/compose/nats.conf``."""
    server = {"port": 4222, "http_port": 8222, "jetstream": {"store_dir": "/data"}}
    return COMPOSE_HEADER + server_config(server)


def users(chart_values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every NATS user of the values file by name: ``{"account": ..., **user}``."""
    found: dict[str, dict[str, Any]] = {}
    for account, body in merge_section(chart_values)["accounts"].items():
        for user in body.get("users", []):
            found[user["user"]] = {"account": account, **user}
    return found


if __name__ == "__main__":
    sys.stdout.write(compose_config())
