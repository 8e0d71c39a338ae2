"""Scenario 3: tunnel open, the REST call until ``tunnel.ready`` came back.

gurutunnel: ``POST /tunnel/open`` answers 201 once the agent answered ``tunnel.ready`` (the
session row inserted, the request on the bus, the gateway binding the session, the row marked
active, audit rows written). The naive bridge: ``POST /request/<name>`` with ``open`` on its
bare ASGI app, a NATS request answered ``ready`` by its peer. Each open is followed by an
untimed close on both sides; the two run in interleaved blocks over a few agents.
"""

from __future__ import annotations

import time

from ..harness import Bench
from ..results import Goal, Row, ScenarioResult
from ..stats import summary
from .common import bridge_rest_call, interleaved


async def run_open(bench: Bench) -> ScenarioResult:
    p = bench.profile
    result = ScenarioResult("open", 3, "Tunnel open (REST call to tunnel.ready)")
    first = p.command_agents
    agents = bench.pool[first : first + p.open_agents]
    names = bench.bridge_names[: p.open_agents]

    async def gurutunnel(i: int) -> float:
        agent = agents[i % len(agents)]
        t0 = time.perf_counter()
        r = await bench.api.post("/tunnel/open", json={"agent_id": agent.id})
        elapsed = time.perf_counter() - t0
        if r.status_code != 201 or r.json().get("state") != "active":
            raise RuntimeError(f"open failed: {r.status_code} {r.text[:300]}")
        closed = await bench.api.post("/tunnel/close", json={"session_id": r.json()["id"]})
        closed.raise_for_status()
        return elapsed

    async def bridge(i: int) -> float:
        name = names[i % len(names)]
        elapsed = await bridge_rest_call(bench, name, b"open", b"ready")
        await bridge_rest_call(bench, name, b"close", b"closed")
        return elapsed

    samples = await interleaved(
        {"gurutunnel": gurutunnel, "bridge": bridge},
        {"gurutunnel": p.open_samples, "bridge": p.open_samples},
        p.interleave_block,
        max(2, p.rt_warmup // 5),
    )
    gt, br = summary(samples["gurutunnel"]), summary(samples["bridge"])
    bridge_name = "naive bridge (bare ASGI POST -> NATS request -> peer)"
    result.rows = [
        Row("open, p50", "ms", gt["p50"], br["p50"], bridge_name, Goal("ratio<=", 1.3)),
        Row("open, p99", "ms", gt["p99"], br["p99"], bridge_name, Goal("ratio<=", 1.3)),
    ]
    result.details = {"agents": len(agents), "gurutunnel_ms": gt, "bridge_ms": br}
    result.samples = {"REST open": samples["gurutunnel"], "bridge open": samples["bridge"]}
    return result
