"""Scenario 4: streamed output of a session, read by a technician over the API's WebSocket.

The simulated agent emits incompressible output as fast as its socket takes it (``bench
stream``); the technician reads every message on ``/tunnel/{id}/ws``. The naive bridge's peer
sends binary frames of the same sizes to its gateway, which publishes them on NATS, and its
API forwards them to the reader's WebSocket. MB/s are 10^6 bytes of output per second, from
the start message to the last byte. Then 20 sessions (and 20 bridge streams) at once: the
aggregate rate and how fairly it is shared: Jain's index of the bytes each session had received
when the first one ended (1 = equal shares).
"""

from __future__ import annotations

import asyncio
import collections

from ..harness import Bench
from ..results import Goal, Row, ScenarioResult
from ..stats import jain_index
from .common import StartGate, StreamRun, bridge_stream, gurutunnel_stream

GOAL_ROUNDS = 3
"""Rounds of the one-session 4 KiB stream on each side (the goal's row): the median counts."""


async def _many(runs: list[asyncio.Task[StreamRun]], gate: StartGate) -> list[StreamRun]:
    # every socket connected before the start (a stream that failed to connect shows in gather)
    connected = asyncio.ensure_future(gate.all_connected.wait())
    await asyncio.wait([connected, *runs], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    connected.cancel()
    await asyncio.sleep(0.2)  # the server side of the last sockets (ticket, subscription)
    gate.go.set()
    return list(await asyncio.gather(*runs))


def _aggregate(runs: list[StreamRun]) -> tuple[float, float, list[float]]:
    """(aggregate MB/s, Jain's index of the shares, each session's MB received by then): the
    shares are the bytes each session had received when the first one ended, the moment until
    which all of them competed (a rate over each one's own duration would hide a session
    starved at first that caught up alone at the end)."""
    start = min(r.started_at for r in runs)
    end = max(r.ended_at for r in runs)
    total = sum(r.received for r in runs)
    first_end = min(r.ended_at for r in runs)
    shares = [r.received_at(first_end) / 1e6 for r in runs]
    return total / (end - start) / 1e6, jain_index(shares), shares


async def run_stream(bench: Bench) -> ScenarioResult:
    p = bench.profile
    result = ScenarioResult("stream", 4, "Streamed output of a session")
    agent = bench.pool[0]
    session_id = await bench.open_session(agent)
    name = bench.bridge_names[0]
    rounds: dict[str, list[StreamRun]] = collections.defaultdict(list)
    for chunk, times in ((4096, GOAL_ROUNDS), (32768, 1)):
        # the goal's rate: rounds alternating between the sides (a change of the machine's
        # load falls on both), the median round of each side
        for _ in range(times):
            rounds[f"gurutunnel_{chunk}"].append(
                await gurutunnel_stream(bench, session_id, p.stream_bytes, chunk)
            )
            rounds[f"bridge_{chunk}"].append(
                await bridge_stream(bench, name, p.stream_bytes, chunk)
            )
    singles = {
        k: sorted(runs, key=lambda r: r.mb_per_s)[len(runs) // 2] for k, runs in rounds.items()
    }
    single_runs = [r for runs in rounds.values() for r in runs]

    n = p.stream_sessions
    sessions = [await bench.open_session(a) for a in bench.pool[:n]]
    go = StartGate(n)
    gt_runs = await _many(
        [
            asyncio.create_task(gurutunnel_stream(bench, sid, p.stream_bytes_each, 4096, go=go))
            for sid in sessions
        ],
        go,
    )
    go = StartGate(n)
    br_runs = await _many(
        [
            asyncio.create_task(bridge_stream(bench, nm, p.stream_bytes_each, 4096, go=go))
            for nm in bench.bridge_names[:n]
        ],
        go,
    )
    gt_total, gt_jain, gt_shares = _aggregate(gt_runs)
    br_total, br_jain, br_shares = _aggregate(br_runs)

    def rate(key: str) -> float:
        return singles[key].mb_per_s

    result.rows = [
        Row(
            "one session, 4 KiB chunks",
            "MB/s",
            rate("gurutunnel_4096"),
            rate("bridge_4096"),
            "naive bridge, 4 KiB frames",
            Goal("ratio>=", 0.8),
            f"median of {GOAL_ROUNDS} rounds per side, alternating",
        ),
        Row(
            "one session, 32 KiB chunks (the agent's chunk size)",
            "MB/s",
            rate("gurutunnel_32768"),
            rate("bridge_32768"),
            "naive bridge, 32 KiB frames",
        ),
        Row(
            f"{n} sessions at once, aggregate (4 KiB)",
            "MB/s",
            gt_total,
            br_total,
            f"naive bridge, {n} streams",
        ),
        Row(
            f"{n} sessions at once, fairness (Jain index)",
            "",
            gt_jain,
            br_jain,
            f"naive bridge, {n} streams",
            Goal(">=", 0.9),
        ),
    ]
    delivered = {
        "gurutunnel, many": sum(r.received for r in gt_runs) / (n * p.stream_bytes_each),
        "bridge, many": sum(r.received for r in br_runs) / (n * p.stream_bytes_each),
    } | {k: min(r.received for r in runs) / p.stream_bytes for k, runs in rounds.items()}
    for row, keys in (
        (result.rows[0], ("gurutunnel_4096", "bridge_4096")),
        (result.rows[1], ("gurutunnel_32768", "bridge_32768")),
        (result.rows[2], ("gurutunnel, many", "bridge, many")),
    ):
        short = [
            f"{k.split('_')[0].split(',')[0]} {delivered[k]:.1%}" for k in keys if delivered[k] < 1
        ]
        if short:
            lost = "delivered " + ", ".join(short) + " of the bytes (the rest lost on NATS)"
            row.note = f"{row.note}; {lost}" if row.note else lost
    result.details = {
        "bytes_single": p.stream_bytes,
        "bytes_each_of_many": p.stream_bytes_each,
        "sessions": n,
        "singles": {
            k: {
                "mb_per_s": r.mb_per_s,
                "received": r.received,
                "gaps": r.gaps,
                "seconds": r.seconds,
                "incomplete": r.incomplete,
            }
            for k, r in singles.items()
        },
        "rounds_mb_per_s": {k: [r.mb_per_s for r in runs] for k, runs in rounds.items()},
        "gurutunnel_session_mb_when_first_ended": gt_shares,
        "bridge_stream_mb_when_first_ended": br_shares,
        "share_delivered": delivered,
        # the bridge has no sequence numbers: it cannot see a gap
        "gurutunnel_gap_frames": sum(r.gaps for r in [*single_runs, *gt_runs]),
        "incomplete_runs": {
            "gurutunnel": sum(r.incomplete for r in gt_runs),
            "bridge": sum(r.incomplete for r in br_runs),
            "single rounds": sum(r.incomplete for r in single_runs),
        },
        "errors": [r.error for r in [*single_runs, *gt_runs] if r.error],
    }
    result.samples = {"gurutunnel shares": gt_shares, "bridge shares": br_shares}
    return result
