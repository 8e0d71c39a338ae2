"""The NATS users of ``deploy/k8s/nats/values.yaml``: least privilege, yet enough for the code.

Two ways: the subjects each role's code uses are computed from ``gurutunnel_protocol.Subjects``
(with the prefix the manifests configure) and matched against the user's permissions with NATS
wildcard rules, together with subjects a role must NOT touch; and a real ``nats-server``
configured from the values file (as the chart renders it) carries a real session between the
real API, gateway and agent processes without a single permissions violation, while refusing
what each role must not do.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from devstack.processes import wait_until
from devstack.stack import Stack, StackConfig
from gurutunnel_protocol import Subjects
from tests.deploy import natsconf
from tests.deploy.support import (
    COMPOSE_FILE,
    OVERLAYS,
    allowed,
    documents,
    env_values,
    find,
    render,
    subject_covered,
)
from tests.support.services import free_port, nats_server_binary, wait_for_port

AGENT = "agent-1"
SESSION = "session-1"
GATEWAY_USER = "gurutunnel-gateway"
API_USER = "gurutunnel-api"
OPS_USER = "gurutunnel-ops"

Uses = Callable[[Subjects], dict[str, list[str]]]
"""Subjects by direction (``publish``, ``subscribe``) for one role."""


def _configured_prefixes() -> set[str]:
    """Every subject prefix the Kubernetes overlays and the compose file give the services."""
    found: set[str] = set()
    for overlay in OVERLAYS.values():
        objects = render(overlay)
        for name, key in (
            ("gurutunnel-api", "GT_API_SUBJECT_PREFIX"),
            ("gurutunnel-gateway", "GT_GATEWAY_SUBJECT_PREFIX"),
        ):
            container = find(objects, "Deployment", name)["spec"]["template"]["spec"]
            found.add(env_values(container["containers"][0])[key])
    compose = documents(COMPOSE_FILE.read_text())[0]
    for service in compose["services"].values():
        env = service.get("environment", {})
        for key in ("GT_API_SUBJECT_PREFIX", "GT_GATEWAY_SUBJECT_PREFIX"):
            if key in env:
                found.add(env[key])
    return found


@pytest.fixture(scope="module")
def subjects() -> Subjects:
    """Subjects with the one prefix every manifest configures."""
    prefixes = _configured_prefixes()
    assert len(prefixes) == 1, f"the manifests configure several prefixes: {prefixes}"
    return Subjects(prefixes.pop())


@pytest.fixture(scope="module")
def users() -> dict[str, dict[str, Any]]:
    return natsconf.users()


def _kv_stream(s: Subjects) -> str:
    return f"KV_{s.revocation_bucket}"


def used_by_gateway(s: Subjects) -> dict[str, list[str]]:
    """What ``services/gateway`` publishes and subscribes to (bus.py, connection.py, server.py)."""
    return {
        "publish": [
            s.agent_events(AGENT, "heartbeat"),
            s.presence(AGENT),
            s.session_up(SESSION),
            s.gateway_heartbeat(),
            s.gateway_control(),
            f"$JS.API.STREAM.INFO.{s.presence_stream}",
            f"$JS.API.STREAM.CREATE.{s.presence_stream}",
            f"$JS.API.STREAM.INFO.{_kv_stream(s)}",
            f"$JS.API.STREAM.CREATE.{_kv_stream(s)}",
            f"$JS.API.CONSUMER.CREATE.{_kv_stream(s)}",
            f"$JS.API.CONSUMER.INFO.{_kv_stream(s)}.ordered-consumer",
            f"$JS.API.CONSUMER.DELETE.{_kv_stream(s)}.ordered-consumer",
        ],
        "subscribe": [
            s.agent_commands(AGENT),
            s.session_down(SESSION),
            s.gateway_control(),
            "_INBOX.>",
        ],
    }


def used_by_api(s: Subjects) -> dict[str, list[str]]:
    """What ``services/api`` publishes and subscribes to (bus.py)."""
    stream, consumer = s.presence_stream, s.presence_consumer
    return {
        "publish": [
            s.agent_commands(AGENT),
            s.session_down(SESSION),
            s.gateway_control(),
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
            f"$JS.ACK.{stream}.{consumer}.1.2.3.1700000000000000000.0",
            f"$JS.API.STREAM.INFO.{_kv_stream(s)}",
            f"$JS.API.STREAM.CREATE.{_kv_stream(s)}",
            f"$KV.{s.revocation_bucket}.{AGENT}",
        ],
        "subscribe": [
            s.all_agent_events(),
            s.gateway_heartbeat(),
            s.session_up(SESSION),
            "_INBOX.>",
        ],
    }


def forbidden_to_gateway(s: Subjects) -> dict[str, list[str]]:
    """What only the API may do: command agents, write technician input, revoke credentials."""
    stream = s.presence_stream
    return {
        "publish": [
            s.agent_commands(AGENT),
            s.session_down(SESSION),
            f"$KV.{s.revocation_bucket}.{AGENT}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{s.presence_consumer}",
            f"$JS.API.STREAM.DELETE.{stream}",
            f"$JS.API.STREAM.PURGE.{stream}",
            f"$JS.API.STREAM.DELETE.{_kv_stream(s)}",
            "_INBOX.forged-reply",
            ">",
        ],
        "subscribe": [
            s.session_up(SESSION),
            s.all_agent_events(),
            s.gateway_heartbeat(),
            s.all_presence(),
            s.all_sessions(),
            ">",
        ],
    }


def forbidden_to_api(s: Subjects) -> dict[str, list[str]]:
    """What only gateways may do: speak for agents (presence, output, heartbeats) and leases."""
    stream = s.presence_stream
    return {
        "publish": [
            s.presence(AGENT),
            s.session_up(SESSION),
            s.agent_events(AGENT, "heartbeat"),
            s.gateway_heartbeat(),
            f"$JS.API.STREAM.DELETE.{stream}",
            f"$JS.API.STREAM.PURGE.{stream}",
            f"$JS.API.STREAM.DELETE.{_kv_stream(s)}",
            ">",
        ],
        "subscribe": [
            s.agent_commands(AGENT),
            s.session_down(SESSION),
            s.all_sessions(),
            ">",
        ],
    }


SUBJECT_MEMBERS = {
    "agent_commands": "api publishes, gateway subscribes",
    "agent_events": "gateway publishes",
    "all_agent_events": "api subscribes",
    "presence": "gateway publishes (JetStream)",
    "all_presence": "the presence stream's subjects",
    "session_up": "gateway publishes, api subscribes",
    "session_down": "api publishes, gateway subscribes",
    "all_sessions": "taps and tests only",
    "gateway_heartbeat": "gateway publishes, api subscribes",
    "gateway_control": "api and gateways publish, gateways subscribe",
    "presence_stream": "JetStream API subjects of both",
    "presence_consumer": "JetStream API subjects of the api",
    "revocation_bucket": "KV subjects: api writes, gateways watch",
    "api_queue": "queue group name, no subject",
    "event_kind": "reads an agent_events subject back, no subject of its own",
    "up_session_id": "reads a session_up subject back, no subject of its own",
}
"""Every subject builder of ``Subjects`` and where this file accounts for it."""


def test_every_subject_builder_is_accounted_for() -> None:
    """A new subject in libs/protocol fails here until the NATS users are updated for it."""
    members = {
        name
        for name in dir(Subjects)
        if not name.startswith("_") and name not in Subjects.__dataclass_fields__
    }
    assert members == set(SUBJECT_MEMBERS), (
        f"new: {sorted(members - set(SUBJECT_MEMBERS))}, "
        f"gone: {sorted(set(SUBJECT_MEMBERS) - members)}"
    )


def test_nats_is_a_three_node_jetstream_cluster_on_disk() -> None:
    """Three clustered servers with file-backed JetStream, spread over nodes."""
    config = natsconf.values()["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["pvc"]["size"]
    assert natsconf.merge_section()["accounts"]["GURUTUNNEL"]["jetstream"]
    spread = natsconf.values()["podTemplate"]["topologySpreadConstraints"]
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"


def test_only_the_gateway_and_api_have_service_users(users: dict[str, dict[str, Any]]) -> None:
    """Two service users share the gurutunnel account; the CLI has none. The operators' users
    touch no application subject: gurutunnel-ops only the JetStream API, sys another account."""
    assert set(users) == {GATEWAY_USER, API_USER, OPS_USER, "sys"}
    account = users[GATEWAY_USER]["account"]
    assert users[API_USER]["account"] == users[OPS_USER]["account"] == account
    assert users["sys"]["account"] != account
    assert natsconf.merge_section()["system_account"] == users["sys"]["account"]
    ops = users[OPS_USER]["permissions"]
    assert ops["publish"]["allow"] == ["$JS.API.>"] and ops["subscribe"]["allow"] == ["_INBOX.>"]
    for user in users.values():
        # a reference to an environment variable, never a literal password
        assert user["password"].startswith("<< $") and user["password"].endswith(" >>")


@pytest.mark.parametrize("direction", ["publish", "subscribe"])
@pytest.mark.parametrize(
    ("user", "uses"), [(GATEWAY_USER, used_by_gateway), (API_USER, used_by_api)]
)
def test_each_role_may_use_every_subject_its_code_uses(
    users: dict[str, dict[str, Any]], subjects: Subjects, user: str, uses: Uses, direction: str
) -> None:
    """Every subject the role's code publishes or subscribes to matches an allowed pattern."""
    permissions = users[user]["permissions"]
    refused = [s for s in uses(subjects)[direction] if not allowed(permissions, direction, s)]
    assert not refused, f"{user} may not {direction} {refused}"


@pytest.mark.parametrize("direction", ["publish", "subscribe"])
@pytest.mark.parametrize(
    ("user", "forbidden"), [(GATEWAY_USER, forbidden_to_gateway), (API_USER, forbidden_to_api)]
)
def test_a_role_cannot_use_what_belongs_to_the_other(
    users: dict[str, dict[str, Any]], subjects: Subjects, user: str, forbidden: Uses, direction: str
) -> None:
    """The gateway cannot command agents or revoke; the API cannot speak for agents or gateways."""
    permissions = users[user]["permissions"]
    granted = [s for s in forbidden(subjects)[direction] if allowed(permissions, direction, s)]
    assert not granted, f"{user} may {direction} {granted}"


def test_gateway_replies_only_to_requests_it_received(users: dict[str, dict[str, Any]]) -> None:
    """Replies go through allow_responses, not a blanket publish right on every inbox."""
    permissions = users[GATEWAY_USER]["permissions"]
    assert permissions["allow_responses"] is True
    assert not allowed(permissions, "publish", "_INBOX.anything")


@pytest.mark.parametrize(
    ("pattern", "subject", "covered"),
    [
        ("gt.agent.*.cmd", "gt.agent.a1.cmd", True),
        ("gt.agent.*.cmd", "gt.agent.a1.evt.heartbeat", False),
        ("gt.agent.*.evt.>", "gt.agent.*.evt.>", True),
        ("gt.agent.*.evt.>", "gt.agent.a1.evt", False),
        ("gt.presence.*", "gt.presence.>", False),
        ("gt.>", "gt.session.s1.up", True),
        ("gt.session.*.up", "gt.session.*.>", False),
        ("_INBOX.>", "_INBOX.abc.*", True),
    ],
)
def test_subject_matching_follows_nats_wildcards(pattern: str, subject: str, covered: bool) -> None:
    """The matcher the checks above rely on: ``*`` one token, ``>`` one or more at the end."""
    assert subject_covered(pattern, subject) is covered


def test_compose_nats_conf_is_the_rendering_of_the_values_file() -> None:
    """deploy/compose/nats.conf holds the same users and permissions (regenerate if not)."""
    assert natsconf.COMPOSE_CONF.read_text() == natsconf.compose_config(), (
        "run: .venv/bin/python -m tests.deploy.natsconf > deploy/compose/nats.conf"
    )


def test_chart_passes_every_password_variable_from_the_users_secret() -> None:
    """Each ``$VAR`` of the users comes from the Secret gurutunnel-nats-users in container.env."""
    env = natsconf.values()["container"]["env"]
    for user in natsconf.users().values():
        variable = user["password"].removeprefix("<< $").removesuffix(" >>")
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "gurutunnel-nats-users"


@pytest.mark.parametrize("config", ["values", "compose"])
def test_nats_server_accepts_the_configuration(tmp_path: Path, config: str) -> None:
    """nats-server itself (the wheel's) validates the rendered configuration strictly."""
    if config == "values":
        text = natsconf.server_config({"port": 4222, "jetstream": {"store_dir": str(tmp_path)}})
    else:
        text = natsconf.COMPOSE_CONF.read_text()
    path = tmp_path / "nats.conf"
    path.write_text(text)
    env = {**os.environ, **{var: "x" * 32 for var in _password_variables()}}
    done = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout


def _password_variables() -> list[str]:
    return [
        u["password"].removeprefix("<< $").removesuffix(" >>") for u in natsconf.users().values()
    ]


# ---------------------------------------------------------------- a real server with these users


@dataclass
class SecuredNats:
    port: int
    passwords: dict[str, str]
    log: Path

    def url(self, user: str) -> str:
        return f"nats://{user}:{self.passwords[user]}@127.0.0.1:{self.port}"

    def violations(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "Violation" in line]


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[SecuredNats]:
    """A nats-server of its own, configured from the values file as the chart renders it."""
    port = free_port()
    variables = {u: v for u, v in zip(natsconf.users(), _password_variables(), strict=True)}
    passwords = {user: secrets.token_hex(16) for user in variables}
    conf = tmp_path / "nats.conf"
    conf.write_text(
        natsconf.server_config(
            {"host": "127.0.0.1", "port": port, "jetstream": {"store_dir": str(tmp_path / "js")}}
        )
    )
    log = tmp_path / "nats.log"
    env = {**os.environ, **{variables[user]: pw for user, pw in passwords.items()}}
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(conf), "-l", str(log)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port)
        yield SecuredNats(port=port, passwords=passwords, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_online(client: httpx.Client, agent_id: str) -> None:
    def online() -> bool:
        r = client.get(f"/agents/{agent_id}")
        return r.status_code == 200 and r.json()["online"] is True

    wait_until(online, timeout_s=20, what=f"agent {agent_id} online")


@pytest.mark.slow
def test_real_services_run_a_session_within_their_permissions(
    secured_nats: SecuredNats, subjects: Subjects, tmp_path: Path
) -> None:
    """API, gateway and agent processes on the secured server: open, exec, close and revoke
    work, and the server logs no permissions violation."""
    stack = Stack(
        StackConfig(
            root=tmp_path / "stack",
            nats_url=f"nats://127.0.0.1:{secured_nats.port}",
            subject_prefix=subjects.prefix,
            api_env={
                "GT_API_NATS_URL": secured_nats.url(API_USER),
                "GT_API_OPEN_TIMEOUT_S": "5",
            },
            gateway_env={
                "GT_GATEWAY_NATS_URL": secured_nats.url(GATEWAY_USER),
                "GT_GATEWAY_HEARTBEAT_INTERVAL_S": "0.5",
            },
            agent_env={"GT_AGENT_HEARTBEAT_INTERVAL_S": "1", "GT_AGENT_BACKOFF_MAX_S": "1"},
        )
    )
    try:
        stack.start_api()
        password = stack.create_admin("admin")
        stack.start_gateway()
        token = stack.token("admin", password)
        agent = stack.enroll(token, "perm-agent")
        agent_proc = stack.start_agent(agent)
        with stack.client(token) as client:
            _wait_online(client, agent.id)
            opened = client.post("/tunnel/open", json={"agent_id": agent.id})
            assert opened.status_code == 201, opened.text
            session_id = opened.json()["id"]
            ran = client.post(f"/tunnel/{session_id}/exec", json={"argv": ["echo", "permitted"]})
            assert ran.status_code == 200, ran.text
            assert ran.json()["stdout"] == "permitted\n"
            closed = client.post("/tunnel/close", json={"session_id": session_id})
            assert closed.status_code == 200, closed.text
            revoked = client.post(f"/agents/{agent.id}/revoke")
            assert revoked.status_code == 200, revoked.text
            # the gateway saw the revocation in the bucket it watches and cut the agent off
            wait_until(
                lambda: agent_proc.proc is not None and agent_proc.proc.poll() is not None,
                timeout_s=20,
                what="revoked agent cut off",
            )
    finally:
        stack.close()
    assert secured_nats.violations() == []


@pytest.mark.parametrize(
    ("user", "subject"),
    [
        pytest.param(GATEWAY_USER, lambda s: s.agent_commands(AGENT), id="gateway-agent-cmd"),
        pytest.param(GATEWAY_USER, lambda s: s.session_down(SESSION), id="gateway-session-down"),
        pytest.param(API_USER, lambda s: s.presence(AGENT), id="api-presence"),
        pytest.param(API_USER, lambda s: s.session_up(SESSION), id="api-session-up"),
    ],
)
async def test_the_server_refuses_a_publish_outside_the_role(
    secured_nats: SecuredNats, subjects: Subjects, user: str, subject: Callable[[Subjects], str]
) -> None:
    """The rendered permissions are enforced: the server reports and drops the publish."""
    target = subject(subjects)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    def logged() -> bool:
        return any(f'Subject "{target}"' in line for line in secured_nats.violations())

    nc = await nats.connect(secured_nats.url(user), error_cb=on_error, connect_timeout=5)
    try:
        await nc.publish(target, b"{}")
        await nc.flush(timeout=5)
        # the server answers -ERR first and logs the violation just after: wait for both
        deadline = time.monotonic() + 5
        while not (errors and logged()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await nc.close()
    assert any("permissions violation" in str(e).lower() for e in errors), errors
    assert logged()


async def test_ops_user_administers_streams_but_touches_no_subject(
    secured_nats: SecuredNats, subjects: Subjects
) -> None:
    """gurutunnel-ops may create, inspect and edit the account's streams (raising replicas on a
    cluster), and may not publish application subjects."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(secured_nats.url(OPS_USER), error_cb=on_error, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name=subjects.presence_stream, subjects=[subjects.all_presence()])
        info = await js.stream_info(subjects.presence_stream)
        updated = await js.update_stream(info.config)
        assert updated.config.name == subjects.presence_stream
        await nc.publish(subjects.presence(AGENT), b"{}")
        await nc.flush(timeout=5)
        deadline = time.monotonic() + 5
        while not errors and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await nc.close()
    assert any("permissions violation" in str(e).lower() for e in errors), errors
