"""``deploy/compose``: a valid compose file whose services, settings and wiring fit the code.

The file is validated against the Compose Specification's JSON schema as compiled into the
pydantic models of the ``compose-pydantic`` package (extension ``x-`` keys, which the schema
allows but those models do not, are dropped first). Then: every service the design names, both
gateways behind the load balancer (its health check on /readyz), the API migrated by a one-shot
service before it serves, key generation by a one-shot ``gurutunnel-api keygen``, environment
names that exist in the settings classes, secrets only from ``.env``, and the bootstrap script
run for real against a real API.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from compose_pydantic import ComposeSpecification  # type: ignore[import-untyped]
from pydantic_settings import BaseSettings

from devstack.processes import ManagedProcess, executable, wait_until
from devstack.stack import Stack, StackConfig
from gurutunnel_agent.config import AgentSettings
from gurutunnel_api.config import ApiSettings
from gurutunnel_gateway.config import GatewaySettings
from tests.deploy import natsconf
from tests.deploy.support import (
    COMPOSE_DIR,
    COMPOSE_FILE,
    PLACEHOLDER,
    documents,
    gateway_stop_bound,
    settings_env_names,
)

SETTINGS: dict[str, type[BaseSettings]] = {
    "GT_API_": ApiSettings,
    "GT_GATEWAY_": GatewaySettings,
    "GT_AGENT_": AgentSettings,
}
_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return documents(COMPOSE_FILE.read_text())[0]


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _image(service: dict[str, Any]) -> str:
    image: str = service["image"]
    return image


def _by_image(services: dict[str, dict[str, Any]], repository: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if _image(s).partition(":")[0] == repository}


def _haproxy() -> dict[str, list[str]]:
    """Section header -> its lines, from deploy/compose/haproxy.cfg."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in (COMPOSE_DIR / "haproxy.cfg").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line.startswith((" ", "\t")):
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(line.strip())
    return sections


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    """The file (minus x- extension keys) is valid for the Compose Specification schema."""
    spec = {k: v for k, v in compose.items() if not k.startswith("x-")}
    model = ComposeSpecification.model_validate(spec)
    assert model.services


def test_every_part_of_the_deployment_is_a_service(services: dict[str, dict[str, Any]]) -> None:
    """NATS, PostgreSQL, the one-shots, the API, two gateways, the load balancer, an agent."""
    assert {"nats", "postgres", "keygen", "migrate", "api", "lb", "bootstrap", "agent"} <= set(
        services
    )
    assert len(_by_image(services, "gurutunnel/gateway")) == 2


def test_nats_runs_jetstream_with_the_role_users(services: dict[str, dict[str, Any]]) -> None:
    """NATS reads the generated nats.conf (JetStream on, users of the chart values)."""
    nats = services["nats"]
    assert "./nats.conf:/etc/nats/nats.conf:ro" in nats["volumes"]
    assert nats["command"] == ["-c", "/etc/nats/nats.conf"]
    assert '"jetstream"' in (COMPOSE_DIR / "nats.conf").read_text()
    variables = {
        u["password"].removeprefix("<< $").removesuffix(" >>") for u in natsconf.users().values()
    }
    assert variables <= set(nats["environment"])


def test_both_gateways_sit_behind_the_load_balancer(services: dict[str, dict[str, Any]]) -> None:
    """HAProxy balances exactly the gateway services, checks /readyz, and the agent dials it."""
    gateways = _by_image(services, "gurutunnel/gateway")
    config = _haproxy()
    backend = config["backend gateways"]
    servers = {line.split()[1]: line.split()[2] for line in backend if line.startswith("server ")}
    assert set(servers) == set(gateways)
    for name, address in servers.items():
        port = int(gateways[name]["environment"].get("GT_GATEWAY_PORT", 8081))
        assert address == f"{name}:{port}"
    assert "http-check send meth GET uri /readyz" in backend
    assert any(line.startswith("server ") and line.endswith(" check") for line in backend)
    bind = next(line for line in config["frontend agents"] if line.startswith("bind"))
    lb_port = int(bind.split(":")[-1])
    url = urlsplit(services["agent"]["environment"]["GT_AGENT_GATEWAY_URL"])
    assert (url.hostname, url.port, url.path) == ("lb", lb_port, "/agent/v1/connect")
    assert f"{lb_port}:{lb_port}" in services["lb"]["ports"]
    ids = {g["environment"]["GT_GATEWAY_GATEWAY_ID"] for g in gateways.values()}
    assert len(ids) == len(gateways), "each gateway needs its own id"


def test_api_is_migrated_by_a_one_shot_before_it_serves(
    services: dict[str, dict[str, Any]],
) -> None:
    """migrate runs `gurutunnel-api migrate` once; the API waits for its success."""
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["api"]["command"] == ["serve", "--no-migrate"]
    assert services["api"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_agent_signing_keys_come_from_a_one_shot_keygen(
    services: dict[str, dict[str, Any]],
) -> None:
    """keygen writes the pair the API signs with and the gateways verify with."""
    script = " ".join(services["keygen"]["command"])
    private = re.search(r"--private (\S+)", script)
    public = re.search(r"--public (\S+)", script)
    assert "gurutunnel-api keygen" in script and private and public
    assert services["api"]["environment"]["GT_API_AGENT_SIGNING_KEY_FILE"] == private.group(1)
    for name, gateway in _by_image(services, "gurutunnel/gateway").items():
        assert gateway["environment"]["GT_GATEWAY_AGENT_PUBLIC_KEY_FILE"] == public.group(1), name
        assert gateway["depends_on"]["keygen"]["condition"] == "service_completed_successfully"


def test_settings_variables_name_real_settings(services: dict[str, dict[str, Any]]) -> None:
    """Every GT_API_*, GT_GATEWAY_*, GT_AGENT_* variable is a field of its settings class."""
    for name, service in services.items():
        for key in service.get("environment", {}):
            for prefix, settings in SETTINGS.items():
                if key.upper().startswith(prefix):
                    assert key in settings_env_names(settings, prefix), f"{name}: {key}"


def test_nats_urls_log_in_as_the_role_users(services: dict[str, dict[str, Any]]) -> None:
    """The API and the gateways use their own NATS users, passwords from the environment."""
    users = natsconf.users()
    urls = {"GT_API_NATS_URL": "gurutunnel-api", "GT_GATEWAY_NATS_URL": "gurutunnel-gateway"}
    seen = set()
    for service in services.values():
        for key, user in urls.items():
            if key in service.get("environment", {}):
                url = service["environment"][key]
                found = re.fullmatch(r"nats://([^:]+):(\$\{[^}]+\})@nats:4222", url)
                assert found, url
                assert found.group(1) == user and user in users
                assert _VARIABLE.fullmatch(found.group(2))
                seen.add(key)
    assert seen == set(urls)


def test_secrets_come_only_from_env_file_placeholders(compose: dict[str, Any]) -> None:
    """Every ${VAR} of the file is declared in .env.example, whose values are all placeholders."""
    used = set(_VARIABLE.findall(COMPOSE_FILE.read_text()))
    example = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key] = value
    assert used == set(example)
    assert set(example.values()) == {PLACEHOLDER}
    assert ".env" in (COMPOSE_DIR / ".gitignore").read_text().split()


def test_images_are_pinned_and_ours_are_built_here(services: dict[str, dict[str, Any]]) -> None:
    """Every image has a version tag (never latest); ours build from deploy/docker."""
    for name, service in services.items():
        tag = _image(service).rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", name
        if _image(service).startswith("gurutunnel/"):
            dockerfile = service["build"]["dockerfile"]
            assert (COMPOSE_DIR / service["build"]["context"] / dockerfile).is_file(), name


def test_stop_grace_covers_the_gateway_drain(services: dict[str, dict[str, Any]]) -> None:
    """compose waits longer than a gateway's whole drain and stop before it kills it."""
    for name, service in _by_image(services, "gurutunnel/gateway").items():
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace > gateway_stop_bound(service["environment"]), name


@pytest.mark.slow
def test_bootstrap_enrols_the_demo_agent_once(tmp_path: Path, nats_url: str) -> None:
    """bootstrap.py, run as the compose file runs it (API settings in its environment), creates
    the admin and writes a 0600 credential the agent connects with; a second run changes
    nothing."""
    prefix = f"b{os.urandom(4).hex()}.gt"
    stack = Stack(StackConfig(root=tmp_path / "stack", nats_url=nats_url, subject_prefix=prefix))
    credential = tmp_path / "agent" / "credential"
    credential.parent.mkdir()
    admin_password = "bootstrap-" + os.urandom(8).hex()
    try:
        stack.start_api()
        stack.start_gateway()
        env = {
            **os.environ,
            **stack.api_environment(),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "GT_ADMIN_PASSWORD": admin_password,
            "BOOTSTRAP_API_URL": stack.api_url,
            "BOOTSTRAP_AGENT_NAME": "demo-agent",
            "BOOTSTRAP_CREDENTIAL_FILE": str(credential),
        }
        for _ in range(2):
            done = subprocess.run(
                [sys.executable, str(COMPOSE_DIR / "bootstrap.py")],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert admin_password not in done.stdout + done.stderr
        assert stat.S_IMODE(credential.stat().st_mode) == 0o600
        token = stack.token("admin", admin_password)
        with stack.client(token) as client:
            agents = [a for a in client.get("/agents").json()["data"] if a["name"] == "demo-agent"]
            assert len(agents) == 1
            _start_agent(stack, credential)

            def online() -> bool:
                r: httpx.Response = client.get(f"/agents/{agents[0]['id']}")
                return bool(r.json()["online"])

            wait_until(online, timeout_s=20, what="demo agent online")
    finally:
        stack.close()


def _start_agent(stack: Stack, credential: Path) -> None:
    """The real agent, reading its credential from the file bootstrap.py wrote."""
    proc = ManagedProcess(
        "agent-demo",
        [executable("gurutunnel-agent")],
        {
            "GT_AGENT_GATEWAY_URL": stack.gateway_ws_url(),
            "GT_AGENT_CREDENTIAL_FILE": str(credential),
            "GT_AGENT_HEARTBEAT_INTERVAL_S": "1",
        },
        stack.logs / "agent-demo.log",
    ).start()
    stack.processes.append(proc)
