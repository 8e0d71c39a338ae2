"""Scenario 5: idle agents (memory and heartbeat CPU) and scenario 6: the reconnect storm.

Both use gateways of their own (own subject prefix, so the API never sees these agents) and
agents minted with the API's signing key, spread over several simulated-agent processes (one
process may hold at most 20,000 open files here). Their baselines run the same simulated
clients, in ``bare`` mode, against ``bench.baseline bare``.

5: the gateway's RSS with no agent, then at each step of ``idle_steps`` connected agents
(heartbeats every 30 s, the product's default, and keepalive pings flowing):
per agent = (RSS at N - RSS at 0) / N, the median of a few samples after ``idle_settle_s``.
At the largest N, the process CPU over ``idle_cpu_window_s``.

6: ``storm_agents`` agents on gateway 1, a fresh gateway 2 already up (a surviving replica);
the agents list both URLs (the real agent's failover list) and reconnect with its backoff.
Gateway 1 gets SIGKILL; the time until every agent has a new connection is measured, and
meanwhile a prober sends ``tunnel.open``/``tunnel.close`` requests at a fixed rate to agents
already back (known from their ``presence.connected`` events; ``PROBE_AGENTS`` of the storm's
agents, in a process of their own) and times the answers.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from typing import Any

from devstack.processes import free_port
from gurutunnel_protocol import Subjects, new_id
from gurutunnel_protocol.envelope import decode_presence, encode
from gurutunnel_protocol.messages import AgentConnected, TunnelClose, TunnelOpen

from ..harness import Bench, Child, ChildFailed, cpu_seconds, rss
from ..results import Goal, Row, ScenarioResult
from ..simagent import SimConfig
from ..stats import summary

IDLE_PREFIX = "bench5.gt"
STORM_PREFIX = "bench6.gt"
PROBE_AGENTS = 10
"""Storm agents in a process of their own that the prober times commands to: the other
simulated-agent processes are saturated by thousands of reconnects, which real agents (one per
machine) are not, so timing them would measure the harness."""


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _clients(
    bench: Bench,
    label: str,
    urls: list[str],
    size: int,
    credentials: list[str] | None,
) -> list[Child]:
    parts = max(1, math.ceil(size / bench.profile.agents_per_client_process))
    configs = []
    for i in range(parts):
        config = SimConfig(
            mode="gurutunnel" if credentials is not None else "bare",
            urls=urls,
            credentials=credentials[i::parts] if credentials is not None else [],
            count=_shares(size, parts)[i] if credentials is None else 0,
            # each process its own source address: its own range of ephemeral ports
            source_ip=f"127.0.{10 + i}.1",
        )
        configs.append(config)
    return list(
        await asyncio.gather(
            *(bench.start_sim(f"sim-{label}-{i}", config) for i, config in enumerate(configs))
        )
    )


async def _reach(
    children: list[Child], n: int, timeout_s: float, shares: list[int] | None = None
) -> float:
    """Tell the processes to hold ``n`` agents in all (``shares`` each, else an even split);
    seconds until they all connected."""
    t0 = time.monotonic()
    for child, share in zip(children, shares or _shares(n, len(children)), strict=True):
        await child.send({"op": "target", "n": share})

    def reached() -> bool:
        # any client process that died fails the wait now, not at its timeout
        for child in children:
            if not child.alive():
                raise ChildFailed(
                    f"{child.name} exited ({n} agents connecting):\n{child.log_tail()}"
                )
        return _total(children, "connected") >= n

    await children[0].wait_for(reached, timeout_s, f"{n} agents connected")
    return time.monotonic() - t0


def _total(children: list[Child], key: str) -> int:
    """``key``'s count summed over the client processes' last status lines."""
    return sum(c.count(key) for c in children)


async def _settled_rss(pid: int, settle_s: float) -> int:
    await asyncio.sleep(settle_s)
    samples = []
    for _ in range(5):
        samples.append(rss(pid))
        await asyncio.sleep(0.1)
    return int(statistics.median(samples))


async def _stop_all(children: list[Child]) -> None:
    for child in children:
        child.kill()  # the measurement is over; 18k polite closes would only take time
    await asyncio.gather(*(c.stop(timeout_s=5) for c in children), return_exceptions=True)


async def _idle_side(
    bench: Bench, label: str, pid: int, urls: list[str], credentials: list[str] | None
) -> dict[str, Any]:
    p = bench.profile
    children, base = await asyncio.gather(
        _clients(bench, label, urls, max(p.idle_steps), credentials),
        _settled_rss(pid, p.idle_settle_s),
    )
    points = []
    try:
        for n in p.idle_steps:
            seconds = await _reach(children, n, p.idle_connect_timeout_s)
            value = await _settled_rss(pid, p.idle_settle_s)
            points.append(
                {"agents": n, "rss": value, "per_agent": (value - base) / n, "connect_s": seconds}
            )
            bench.console.log(
                f"  {label}: {n} agents, {(value - base) / n / 1024:.1f} KiB each "
                f"(connected in {seconds:.1f} s)"
            )
        cpu, beats_per_s = await _cpu_window(pid, children, p.idle_cpu_window_s)
        held = _total(children, "connected")
        fast: tuple[float, float] | None = None
        if credentials is not None:
            # the same process, sockets and pings, heartbeats at a higher rate: the difference
            # is what the heartbeats cost (a comparison with the bare server would also weigh
            # the two processes' garbage collections and event loops against each other)
            for child in children:
                await child.send({"op": "beat", "interval_s": p.idle_heartbeat_fast_s})
            await asyncio.sleep(p.idle_heartbeat_fast_s)  # every agent on the new rhythm
            fast = await _cpu_window(pid, children, p.idle_cpu_window_s)
    finally:
        await bench.before_stopping(pid)  # a sampler records the measurement, not the teardown
        await _stop_all(children)
    return {
        "rss_at_0": base,
        "points": points,
        "cpu_percent": cpu,
        "held": held,
        "heartbeats_per_s": beats_per_s,
        "fast_cpu_percent": fast[0] if fast else None,
        "fast_heartbeats_per_s": fast[1] if fast else None,
    }


async def _cpu_window(pid: int, children: list[Child], window_s: float) -> tuple[float, float]:
    """(CPU % of ``pid``, heartbeats/s the agents sent) over ``window_s``. The beats are
    counted, not assumed: the first beat goes at the welcome, so the phases of a fleet that
    connected in a burst are not spread evenly over the interval."""
    beats0 = _total(children, "heartbeats")
    c0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(window_s)
    elapsed = time.monotonic() - t0
    cpu = (cpu_seconds(pid) - c0) / elapsed * 100
    beats = _total(children, "heartbeats") - beats0
    return cpu, beats / elapsed


async def run_idle(bench: Bench) -> ScenarioResult:
    p = bench.profile
    result = ScenarioResult("idle", 5, "Idle agents: memory and heartbeat CPU")
    n_max = max(p.idle_steps)
    proc, port = await bench.start_gateway(
        "gw-idle",
        GT_GATEWAY_SUBJECT_PREFIX=IDLE_PREFIX,
        GT_GATEWAY_GATEWAY_ID="gw-idle",
        GT_GATEWAY_AGENT_HEARTBEAT_INTERVAL_S=str(p.idle_heartbeat_interval_s),
    )
    url = f"ws://127.0.0.1:{port}/agent/v1/connect"
    credentials = [c for _, c in bench.mint_credentials(n_max)]
    try:
        gt = await _idle_side(bench, "idle-gw", proc.pid, [url], credentials)
    finally:
        await asyncio.to_thread(proc.stop)
    bare_port = free_port()
    bare = await bench.start_baseline("bare-idle", "bare", str(bare_port), port=bare_port)
    try:
        br = await _idle_side(bench, "idle-bare", bare.pid, [f"ws://127.0.0.1:{bare_port}/"], None)
    finally:
        await bare.stop()

    rows = []
    for g, b in zip(gt["points"], br["points"], strict=True):
        rows.append(
            Row(
                f"memory per agent at {g['agents']} agents",
                "KiB",
                g["per_agent"] / 1024,
                b["per_agent"] / 1024,
                "bare websockets server, same sockets",
                Goal("ratio<=", 2.0),
            )
        )
    heartbeats_per_s = gt["heartbeats_per_s"]
    extra_beats = gt["fast_heartbeats_per_s"] - heartbeats_per_s
    marginal_us = (
        max(0.0, gt["fast_cpu_percent"] - gt["cpu_percent"]) / 100 / extra_beats * 1e6
        if extra_beats > 0
        else None
    )
    rows += [
        Row(
            f"agents held by one gateway process (target {n_max})",
            "agents",
            gt["held"],
            br["held"],
            "bare websockets server",
            Goal(">=", n_max),
        ),
        Row(
            f"process CPU at {n_max} agents (heartbeats and pings)",
            "%",
            gt["cpu_percent"],
            br["cpu_percent"],
            "bare websockets server (pings only)",
            None,
            f"{heartbeats_per_s:.0f} heartbeats/s counted in the window; 100% = one core",
        ),
        Row(
            "CPU per heartbeat",
            "µs",
            marginal_us,
            None,
            None,
            None,
            "decode, stamp, publish on NATS: the gateway's CPU with the agents beating every "
            f"{p.idle_heartbeat_fast_s:g} s ({gt['fast_heartbeats_per_s']:.0f}/s) less its CPU "
            f"above, over the extra heartbeats",
        ),
    ]
    result.rows = rows
    result.details = {
        "gurutunnel": gt,
        "bare": br,
        "heartbeat_interval_s": p.idle_heartbeat_interval_s,
    }
    result.samples = {
        "agents": [float(pt["agents"]) for pt in gt["points"]],
        "gurutunnel KiB per agent": [pt["per_agent"] / 1024 for pt in gt["points"]],
        "bare KiB per agent": [pt["per_agent"] / 1024 for pt in br["points"]],
        "gurutunnel RSS MiB": [pt["rss"] / 2**20 for pt in gt["points"]],
        "bare RSS MiB": [pt["rss"] / 2**20 for pt in br["points"]],
    }
    return result


def _spread(timeline: list[tuple[float, int]], n: int) -> float | None:
    """Seconds from 10% to 90% of ``n`` reconnected (None when 90% was never reached)."""
    t10 = next((t for t, back in timeline if back >= 0.1 * n), None)
    t90 = next((t for t, back in timeline if back >= 0.9 * n), None)
    return None if t10 is None or t90 is None else t90 - t10


ECHO_SUBJECT = "bench.storm.echo"


async def _echo(msg: Any) -> None:
    await msg.respond(msg.data)


class _Prober:
    """Times tunnel.open / tunnel.close requests to agents back on the fresh gateway."""

    def __init__(
        self, bench: Bench, subjects: Subjects, gateway_id: str, agent_ids: set[str]
    ) -> None:
        self.bench = bench
        self.subjects = subjects
        self.gateway_id = gateway_id
        self.agent_ids = agent_ids
        """The probe agents: a process of their own, not busy reconnecting thousands."""
        self.back: list[str] = []
        self.latencies_ms: list[float] = []
        self.floor_ms: list[float] = []
        """NATS round trips, the harness to itself, taken with the probes: the machine's floor."""
        self.errors = 0
        self.floor_errors = 0
        self.subs: list[Any] = []
        self.echo: Any = None

    async def start(self) -> None:
        async def on_presence(msg: Any) -> None:
            event = decode_presence(msg.data)
            if (
                isinstance(event, AgentConnected)
                and event.gateway_id == self.gateway_id
                and event.agent_id in self.agent_ids
            ):
                self.back.append(event.agent_id)

        # the probe agents' subjects only: decoding every agent's event would add the
        # harness's own loop lag (10k events in a few seconds) to the latencies it times
        self.subs = [
            await self.bench.nc.subscribe(self.subjects.presence(agent_id), cb=on_presence)
            for agent_id in sorted(self.agent_ids)
        ]
        self.echo = await self.bench.nc.subscribe(ECHO_SUBJECT, cb=_echo)
        await self.bench.nc.flush()

    async def _one(self, agent_id: str) -> None:
        t0 = time.perf_counter()
        try:
            await self.bench.nc.request(ECHO_SUBJECT, b"x", timeout=5)
        except Exception:
            self.floor_errors += 1  # information only: not a probe error
        else:
            self.floor_ms.append((time.perf_counter() - t0) * 1000)
        session_id = new_id()
        subject = self.subjects.agent_commands(agent_id)
        for frame in (
            TunnelOpen(req_id=new_id(), session_id=session_id, tech_id="bench"),
            TunnelClose(req_id=new_id(), session_id=session_id),
        ):
            t0 = time.perf_counter()
            try:
                await self.bench.nc.request(subject, encode(frame), timeout=5)
            except Exception:
                self.errors += 1
                return
            self.latencies_ms.append((time.perf_counter() - t0) * 1000)

    async def run(self, rate_per_s: float, done: asyncio.Event) -> None:
        tasks: set[asyncio.Task[None]] = set()
        rng = random.Random(6)
        while not done.is_set():
            if self.back:
                task = asyncio.create_task(self._one(rng.choice(self.back)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            with_timeout = asyncio.create_task(done.wait())
            await asyncio.wait({with_timeout}, timeout=1 / rate_per_s)
            with_timeout.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        for sub in [*self.subs, self.echo]:
            if sub is not None:
                await sub.unsubscribe()


async def _storm_side(
    bench: Bench,
    label: str,
    kill: Any,
    urls: list[str],
    credentials: list[str] | None,
    prober: _Prober | None,
    measured_pid: int | None = None,
) -> dict[str, Any]:
    p = bench.profile
    n = p.storm_agents
    probes = PROBE_AGENTS
    # the last PROBE_AGENTS agents live in a process of their own (see _Prober)
    children = await _clients(
        bench, label, urls, n - probes, credentials[:-probes] if credentials else None
    )
    children += await _clients(
        bench, f"{label}-probe", urls, probes, credentials[-probes:] if credentials else None
    )
    shares = [*_shares(n - probes, len(children) - 1), probes]
    try:
        await _reach(children, n, p.idle_connect_timeout_s, shares)
        for child in children:
            await child.send({"op": "mark"})
        # the marks are in effect once every process reported its count restarted
        await children[0].wait_for(
            lambda: all(c.status.get("back", -1) == 0 for c in children),
            10,
            "the storm's marks",
        )
        counted = ("attempts", "refused", "timeouts", "rejected", "failures")
        at_kill = {k: _total(children, k) for k in counted}
        done = asyncio.Event()
        probing = (
            asyncio.create_task(prober.run(p.storm_probe_rate_per_s, done)) if prober else None
        )
        kill()
        t0 = time.monotonic()
        timeline: list[tuple[float, int]] = []
        finished = None
        while time.monotonic() - t0 < p.storm_timeout_s:
            # distinct agents welcomed since the kill, holding their connection
            back = _total(children, "back")
            timeline.append((time.monotonic() - t0, back))
            if back >= n and _total(children, "connected") >= n:
                finished = time.monotonic() - t0
                break
            await asyncio.sleep(0.05)
        done.set()
        if probing is not None:
            await probing
        # how the agents got back: attempts per agent and failed attempts by kind, since the kill
        attempts = {k: _total(children, k) - at_kill[k] for k in counted}
    finally:
        if measured_pid is not None:
            await bench.before_stopping(measured_pid)  # its sampler records the storm only
        await _stop_all(children)
    return {"seconds": finished, "timeline": timeline, "agents": n, "attempts": attempts}


async def run_storm(bench: Bench) -> ScenarioResult:
    p = bench.profile
    result = ScenarioResult("storm", 6, "Reconnect storm after a gateway is killed")
    minted = bench.mint_credentials(p.storm_agents)
    credentials = [c for _, c in minted]
    probe_ids = {agent_id for agent_id, _ in minted[-PROBE_AGENTS:]}
    (g1, port1), (g2, port2) = await asyncio.gather(
        bench.start_gateway(
            "gw-storm-1", GT_GATEWAY_SUBJECT_PREFIX=STORM_PREFIX, GT_GATEWAY_GATEWAY_ID="gw-storm-1"
        ),
        bench.start_gateway(
            "gw-storm-2", GT_GATEWAY_SUBJECT_PREFIX=STORM_PREFIX, GT_GATEWAY_GATEWAY_ID="gw-storm-2"
        ),
    )
    urls = [f"ws://127.0.0.1:{port}/agent/v1/connect" for port in (port1, port2)]
    prober = _Prober(bench, Subjects(STORM_PREFIX), "gw-storm-2", probe_ids)
    await prober.start()
    try:
        gt = await _storm_side(bench, "storm-gw", g1.kill, urls, credentials, prober, g2.pid)
    finally:
        await prober.stop()
        await asyncio.to_thread(g2.stop)
        await asyncio.to_thread(g1.stop)
    b1_port, b2_port = free_port(), free_port()
    b1 = await bench.start_baseline("bare-storm-1", "bare", str(b1_port), port=b1_port)
    b2 = await bench.start_baseline("bare-storm-2", "bare", str(b2_port), port=b2_port)
    try:
        br = await _storm_side(
            bench,
            "storm-bare",
            b1.kill,
            [f"ws://127.0.0.1:{b1_port}/", f"ws://127.0.0.1:{b2_port}/"],
            None,
            None,
        )
    finally:
        await b1.stop()
        await b2.stop()
    lat = summary(prober.latencies_ms)
    floor = summary(prober.floor_ms)
    n = p.storm_agents
    gt_spread, br_spread = _spread(gt["timeline"], n), _spread(br["timeline"], n)
    result.rows = [
        Row(
            f"time until all {n} agents reconnected",
            "s",
            gt["seconds"],
            br["seconds"],
            "bare websockets servers, same clients",
            Goal("ratio<=", 1.3),
            "" if gt["seconds"] is not None else f"not all back within {p.storm_timeout_s:g} s",
        ),
        Row(
            "from 10% to 90% of the agents reconnected",
            "s",
            gt_spread,
            br_spread,
            "bare websockets servers, same clients",
            None,
            "the servers' own absorption rate, without the harness's start-up of the storm",
        ),
        Row(
            "command latency during the storm, p99",
            "ms",
            lat.get("p99"),
            None,
            None,
            Goal("<=", 50),
            "tunnel.open/close to agents already back",
        ),
        Row("command latency during the storm, p50", "ms", lat.get("p50")),
        Row(
            "NATS round trip during the storm, p99",
            "ms",
            floor.get("p99"),
            None,
            None,
            None,
            "the harness to itself, beside each probe: what the loaded machine adds to any "
            "round trip (no gateway, no agent)",
        ),
        Row(
            "commands without an answer within 5 s during the storm (of all sent)",
            "%",
            100 * prober.errors / max(1, prober.errors + len(prober.latencies_ms)),
            None,
            None,
            Goal("<=", 0),
            "a request that failed is not timed; a failed open skips its close",
        ),
    ]
    result.details = {
        "gurutunnel": {k: v for k, v in gt.items() if k != "timeline"},
        "bare": {k: v for k, v in br.items() if k != "timeline"},
        "probe_latency_ms": lat,
        "nats_round_trip_ms": floor,
        "nats_round_trip_errors": prober.floor_errors,
        "probe_errors": prober.errors,
        "probe_rate_per_s": p.storm_probe_rate_per_s,
    }
    result.samples = {
        "gurutunnel t": [t for t, _ in gt["timeline"]],
        "gurutunnel back": [float(k) for _, k in gt["timeline"]],
        "bare t": [t for t, _ in br["timeline"]],
        "bare back": [float(k) for _, k in br["timeline"]],
        "probe latencies": prober.latencies_ms,
    }
    return result
