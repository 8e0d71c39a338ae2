"""A whole gurutunnel deployment on one machine: NATS, API, gateway(s) and agents.

``Stack`` runs the real console scripts with settings passed through the environment only, the
way an operator would. The demo uses it with defaults (NATS from the wheel, SQLite); the
end-to-end tests point it at the test NATS and database, give it a subject prefix of their own
and compress the timings.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .processes import ManagedProcess, executable, free_port, http_ok, port_open

API_PREFIX = "/api/v1"


@dataclass
class StackConfig:
    """Where the stack keeps its files and which shared services it uses."""

    root: Path
    nats_url: str | None = None
    """None: start nats-server from the wheel with JetStream in ``root/nats``."""
    database_url: str | None = None
    """None: SQLite in ``root/api.db``."""
    subject_prefix: str = "gt"
    api_port: int | None = None
    gateway_port: int | None = None
    nats_port: int | None = None
    api_env: dict[str, str] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)
    agent_env: dict[str, str] = field(default_factory=dict)


@dataclass
class EnrolledAgent:
    id: str
    name: str
    credential: str


class Stack:
    """Starts the parts in dependency order and stops them all in reverse."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.root = config.root
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "logs"
        self.processes: list[ManagedProcess] = []
        self.nats_url = config.nats_url or ""
        self.database_url = config.database_url or f"sqlite+aiosqlite:///{self.root / 'api.db'}"
        self.jwt_secret = secrets.token_urlsafe(48)
        self.private_key = self.root / "agent-signing.pem"
        self.public_key = self.root / "agent-signing.pub.pem"
        self.api_port = 0
        self.api: ManagedProcess | None = None
        self.gateways: list[tuple[ManagedProcess, int]] = []

    # ---------------------------------------------------------------- parts
    def start_nats(self) -> str:
        if self.nats_url:
            return self.nats_url
        port = free_port(self.config.nats_port)
        data = self.root / "nats"
        proc = ManagedProcess(
            "nats",
            [
                executable("nats-server"),
                "-a",
                "127.0.0.1",
                "-p",
                str(port),
                "-js",
                "-sd",
                str(data),
            ],
            {},
            self.logs / "nats.log",
        ).start()
        self.processes.append(proc)
        proc.wait_ready(lambda: port_open(port), timeout_s=15)
        self.nats_url = f"nats://127.0.0.1:{port}"
        return self.nats_url

    def api_cli(
        self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
    ) -> str:
        """Run ``gurutunnel-api`` once with the stack's API settings; returns stdout."""
        result = subprocess.run(
            [executable("gurutunnel-api"), *args],
            env={**os.environ, **self.api_environment(), **(env or {})},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"gurutunnel-api {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def api_environment(self) -> dict[str, str]:
        return {
            "GT_API_HOST": "127.0.0.1",
            "GT_API_PORT": str(self.api_port),
            "GT_API_DATABASE_URL": self.database_url,
            "GT_API_NATS_URL": self.nats_url,
            "GT_API_SUBJECT_PREFIX": self.config.subject_prefix,
            "GT_API_JWT_SECRET": self.jwt_secret,
            "GT_API_AGENT_SIGNING_KEY_FILE": str(self.private_key),
            **self.config.api_env,
        }

    def start_api(self, timeout_s: float = 60) -> ManagedProcess:
        if not self.private_key.exists():
            self.api_cli(
                "keygen", "--private", str(self.private_key), "--public", str(self.public_key)
            )
        self.api_port = self.api_port or free_port(self.config.api_port)
        proc = ManagedProcess(
            "api",
            [executable("gurutunnel-api"), "serve"],
            self.api_environment(),
            self.logs / "api.log",
        ).start()
        self.processes.append(proc)
        proc.wait_ready(lambda: http_ok(f"{self.api_url}/readyz"), timeout_s=timeout_s)
        self.api = proc
        return proc

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def create_admin(self, username: str = "admin", password: str | None = None) -> str:
        password = password or secrets.token_urlsafe(12)
        self.api_cli("create-admin", "--username", username, env={"GT_ADMIN_PASSWORD": password})
        return password

    def start_gateway(
        self,
        gateway_id: str | None = None,
        timeout_s: float = 30,
        port: int | None = None,
        **env: str,
    ) -> tuple[ManagedProcess, int]:
        port = port or free_port(self.config.gateway_port if not self.gateways else None)
        gateway_id = gateway_id or f"gw{len(self.gateways) + 1}"
        proc = ManagedProcess(
            f"gateway-{gateway_id}",
            [executable("gurutunnel-gateway")],
            {
                "GT_GATEWAY_HOST": "127.0.0.1",
                "GT_GATEWAY_PORT": str(port),
                "GT_GATEWAY_NATS_URL": self.nats_url,
                "GT_GATEWAY_SUBJECT_PREFIX": self.config.subject_prefix,
                "GT_GATEWAY_AGENT_PUBLIC_KEY_FILE": str(self.public_key),
                "GT_GATEWAY_GATEWAY_ID": gateway_id,
                **self.config.gateway_env,
                **env,
            },
            self.logs / f"gateway-{gateway_id}.log",
        ).start()
        self.processes.append(proc)
        proc.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), timeout_s=timeout_s)
        self.gateways.append((proc, port))
        return proc, port

    def gateway_ws_url(self, index: int = 0) -> str:
        return f"ws://127.0.0.1:{self.gateways[index][1]}/agent/v1/connect"

    def start_agent(
        self, agent: EnrolledAgent, gateway_index: int = 0, **env: str
    ) -> ManagedProcess:
        proc = ManagedProcess(
            f"agent-{agent.name}",
            [executable("gurutunnel-agent")],
            {
                "GT_AGENT_GATEWAY_URL": self.gateway_ws_url(gateway_index),
                "GT_AGENT_CREDENTIAL": agent.credential,
                **self.config.agent_env,
                **env,
            },
            self.logs / f"agent-{agent.name}.log",
        ).start()
        self.processes.append(proc)
        return proc

    # ---------------------------------------------------------------- REST helpers
    def token(self, username: str, password: str) -> str:
        r = httpx.post(
            f"{self.api_url}{API_PREFIX}/auth/token",
            json={"username": username, "password": password},
            timeout=10,
        )
        r.raise_for_status()
        token: str = r.json()["access_token"]
        return token

    def client(self, token: str, timeout_s: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.api_url}{API_PREFIX}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
        )

    def enroll(self, admin_token: str, name: str) -> EnrolledAgent:
        with self.client(admin_token) as c:
            r = c.post("/agents", json={"name": name})
            r.raise_for_status()
            body: dict[str, Any] = r.json()
        return EnrolledAgent(id=body["agent"]["id"], name=name, credential=body["credential"])

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
