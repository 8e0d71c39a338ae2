"""Scenario 1: command round trip, and scenario 2: commands per second with 64 in flight.

Round trip on the bus: what the API does for a command (NATS request ``terminal.command`` on
``agent.<id>.cmd``, the gateway forwards it, the simulated agent answers ``terminal.started``
carrying the output chunk and the exit frame, as the real agent answers a command that ends
within its inline window), timed from the request until the answer carrying the exit frame is
received (then decoded and checked, untimed, as the bridge's answer is received, untimed). The
naive bridge does one NATS request answered by its peer with the output. Through REST: ``POST
/tunnel/{id}/exec`` of the same tiny command, to its full JSON result, beside the bridge's own
REST call (its bare ASGI app: POST, NATS request, peer): what an HTTP round trip costs on the
same machine. The four run in interleaved blocks, rotating over several agents (the gateway
rate-limits control frames per connection).

Scenario 2 measures the gateway, so its load generator costs what the bridge's does: requests
are prebuilt bytes (the codec's exact text, checked by tests/bench) and answers are checked by
their bytes; on a machine of few cores a heavier generator would throttle the gateway.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from ..harness import Bench, CpuMeter
from ..results import Goal, Row, ScenarioResult
from ..stats import summary
from .common import ExitWaiter, bridge_rest_call, bus_command, interleaved, lean_bus_command


async def run_roundtrip(bench: Bench) -> ScenarioResult:
    p = bench.profile
    result = ScenarioResult("roundtrip", 1, "Command round trip")
    agents = bench.pool[: p.rt_agents]
    sessions = [await bench.open_session(agent) for agent in agents]
    names = bench.bridge_names[: p.rt_agents]
    waiter = ExitWaiter()
    await waiter.start(bench)

    async def gurutunnel_bus(i: int) -> float:
        k = i % len(agents)
        return await bus_command(bench, waiter, agents[k].id, sessions[k])

    async def bridge(i: int) -> float:
        t0 = time.perf_counter()
        await bench.nc.request(f"bench.bridge.{names[i % len(names)]}.req", b"echo", timeout=10)
        return time.perf_counter() - t0

    async def bridge_rest(i: int) -> float:
        return await bridge_rest_call(bench, names[i % len(names)], b"echo", b"ok\n")

    async def rest(i: int) -> float:
        session_id = sessions[i % len(sessions)]
        t0 = time.perf_counter()
        r = await bench.api.post(
            f"/tunnel/{session_id}/exec", json={"command": "bench echo", "timeout_s": 30}
        )
        elapsed = time.perf_counter() - t0
        if r.status_code != 200 or r.json().get("stdout") != "ok\n":
            raise RuntimeError(f"exec failed: {r.status_code} {r.text[:300]}")
        return elapsed

    try:
        samples = await interleaved(
            {
                "gurutunnel_bus": gurutunnel_bus,
                "bridge": bridge,
                "rest": rest,
                "bridge_rest": bridge_rest,
            },
            {
                "gurutunnel_bus": p.rt_samples,
                "bridge": p.rt_samples,
                "rest": p.rt_rest_samples,
                "bridge_rest": p.rt_rest_samples,
            },
            p.interleave_block,
            p.rt_warmup,
        )
        # CPU per call of the API and the gateway, from sequential calls after the timed ones
        calls = max(20, p.rt_rest_samples // 5)
        meter = CpuMeter({"api": [bench.api_pid], "gateway": [bench.gateway_pid]})
        meter.start()
        for i in range(calls):
            await rest(i)
        rest_cpu_ms = {k: v / calls * 1000 for k, v in meter.stop_seconds().items()}
        meter.start()
        for i in range(calls):
            k = i % len(agents)
            await bus_command(bench, waiter, agents[k].id, sessions[k])
        bus_cpu_ms = {k: v / calls * 1000 for k, v in meter.stop_seconds().items()}
    finally:
        await waiter.stop()
    gt, br, rs, brs = (
        summary(samples["gurutunnel_bus"]),
        summary(samples["bridge"]),
        summary(samples["rest"]),
        summary(samples["bridge_rest"]),
    )
    bridge_name = "naive bridge (NATS request -> websockets -> peer)"
    bridge_rest_name = "naive bridge through its bare ASGI app (POST -> NATS request -> peer)"
    result.rows = [
        Row(
            "bus round trip, full command, p50",
            "ms",
            gt["p50"],
            br["p50"],
            bridge_name,
            Goal("ratio<=", 1.5),
            "request to the answer carrying the exit frame (started, chunk, exit: a command "
            "that ends within the agent's inline window), received, as the bridge's answer",
        ),
        Row(
            "bus round trip, full command, p99",
            "ms",
            gt["p99"],
            br["p99"],
            bridge_name,
            Goal("ratio<=", 1.5),
        ),
        Row(
            "REST exec round trip, p50",
            "ms",
            rs["p50"],
            brs["p50"],
            bridge_rest_name,
            Goal("<=", 1.5),
            "POST /tunnel/{id}/exec to the full result; the baseline is the bridge's own REST "
            "call: the same HTTP client and server stack without auth, database or JSON, what "
            "an HTTP round trip costs on this machine",
        ),
        Row(
            "REST exec round trip, p99",
            "ms",
            rs["p99"],
            brs["p99"],
            bridge_rest_name,
            Goal("<=", 5),
        ),
        Row(
            "API CPU per REST exec",
            "ms",
            rest_cpu_ms["api"],
            None,
            None,
            None,
            f"CPU time of the API process over {calls} sequential execs, divided",
        ),
        Row(
            "gateway CPU per command (bus)",
            "ms",
            bus_cpu_ms["gateway"],
            None,
            None,
            None,
            f"CPU time of the gateway process over {calls} sequential commands, divided",
        ),
    ]
    result.details = {
        "agents": len(agents),
        "gurutunnel_bus_full_ms": gt,
        "bridge_ms": br,
        "rest_exec_ms": rs,
        "bridge_rest_ms": brs,
        "cpu_ms_per_rest_exec": rest_cpu_ms,
        "cpu_ms_per_bus_command": bus_cpu_ms,
    }
    result.samples = {
        "gurutunnel bus (full command)": samples["gurutunnel_bus"],
        "bridge": samples["bridge"],
        "REST exec": samples["rest"],
        "bridge REST": samples["bridge_rest"],
    }
    return result


async def run_throughput(bench: Bench) -> ScenarioResult:
    """Scenario 2: closed loop, ``tp_in_flight`` commands in flight, one per agent/peer."""
    p = bench.profile
    result = ScenarioResult("throughput", 2, "Commands per second through one gateway")
    n = p.tp_in_flight
    agents = bench.pool[:n]
    sessions = [await bench.open_session(agent) for agent in agents]
    names = bench.bridge_names[:n]
    waiter = ExitWaiter()
    await waiter.start(bench)
    errors = {"gurutunnel": 0, "bridge": 0}

    window_s = p.tp_duration_s / p.tp_rounds

    async def measure(side: str) -> tuple[int, dict[str, float]]:
        """(commands completed in one measured window, CPU % of each process group)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        window_start = start + p.tp_warmup_s
        window_end = window_start + window_s
        done: list[float] = []
        assert bench.bridge_gw is not None
        if side == "gurutunnel":
            gateway, agent_pids = [bench.gateway_pid], [c.pid for c in bench.sim]
        else:
            gateway, agent_pids = [bench.bridge_gw.pid], [c.pid for c in bench.bridge_peers]
        meter = CpuMeter(
            {
                "gateway": gateway,
                "agents": agent_pids,
                "harness (the API's side)": [os.getpid()],
                "nats": [bench.nats_pid],
            }
        )
        cpu: list[dict[str, float]] = []

        async def worker(k: int) -> None:
            if side == "gurutunnel":
                subject = bench.subjects.agent_commands(agents[k].id)
            else:
                subject = f"bench.bridge.{names[k]}.req"
            while loop.time() < window_end:
                try:
                    if side == "gurutunnel":
                        await lean_bus_command(bench, waiter, subject, sessions[k])
                    else:
                        await bench.nc.request(subject, b"echo", timeout=10)
                except Exception:
                    errors[side] += 1
                    continue
                done.append(loop.time())

        async def cpu_probe() -> None:
            await asyncio.sleep(max(0.0, window_start - loop.time()))
            meter.start()
            await asyncio.sleep(max(0.0, window_end - loop.time()))
            cpu.append(meter.stop())

        await asyncio.gather(cpu_probe(), *(worker(k) for k in range(n)))
        counted = sum(1 for t in done if window_start <= t < window_end)
        return counted, cpu[0]

    counts: dict[str, list[int]] = {"gurutunnel": [], "bridge": []}
    cpus: dict[str, list[dict[str, float]]] = {"gurutunnel": [], "bridge": []}
    try:
        for _ in range(p.tp_rounds):  # alternating windows (see Profile.tp_rounds)
            for side in ("gurutunnel", "bridge"):
                counted, used = await measure(side)
                counts[side].append(counted)
                cpus[side].append(used)
    finally:
        await waiter.stop()

    def mean_cpu(side: str) -> dict[str, float]:
        return {k: statistics.fmean(c[k] for c in cpus[side]) for k in cpus[side][0]}

    gt_rate, br_rate = (sum(counts[side]) / p.tp_duration_s for side in ("gurutunnel", "bridge"))
    gt_cpu, br_cpu = mean_cpu("gurutunnel"), mean_cpu("bridge")
    bridge_name = "naive bridge"
    result.rows = [
        Row(
            f"commands/s, {n} in flight",
            "1/s",
            gt_rate,
            br_rate,
            bridge_name,
            Goal("ratio>=", 0.7),
            "full commands (answered with their output and exit) vs bridge request/reply; "
            "both load generators send prebuilt bytes and check answers by their bytes",
        ),
        Row(
            "gateway process CPU during the run",
            "%",
            gt_cpu["gateway"],
            br_cpu["gateway"],
            "bridge gateway process",
            None,
            "100% = one core",
        ),
    ]
    result.details = {
        "in_flight": n,
        "errors": errors,
        "window_s": window_s,
        "rounds": p.tp_rounds,
        "per_window_rates": {
            side: [c / window_s for c in counts[side]] for side in ("gurutunnel", "bridge")
        },
        "cpu_percent_gurutunnel": gt_cpu,
        "cpu_percent_bridge": br_cpu,
    }
    return result
