"""Scenario 7: technicians who stop reading; scenario 8: file transfer through a session.

7: ``stall_sessions`` technicians each start an endless ``bench stream`` (32 KiB chunks, the
agent's size) on the API's WebSocket and never read. The RSS of the API and of the gateway is
sampled every 0.1 s for ``stall_window_s``; growth per stalled session = (peak - before) / K.
The API is expected to drop such a socket (1013) instead of buffering. Baseline: the naive
bridge with as many stalled readers (its API and its gateway processes).

8: one ``file_bytes`` upload (``PUT /tunnel/{id}/files``) and download (``GET``) through a
session; the simulated agent hashes uploads without writing them and serves downloads from a
fixed pattern, so no disk is measured. Reference: the naive bridge streaming the same bytes in
256 KiB frames (the file chunk size), agent to reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ..harness import Bench, RssSampler, rss
from ..results import Goal, Row, ScenarioResult
from ..simagent import FILE_CHUNK_BYTES, pattern_bytes, pattern_sha256
from .common import bridge_stream, mib

ENDLESS = 1 << 50
STALL_CHUNK = 32768
BRIDGE_CAP_BYTES = 1 << 30
"""The bridge's stalled side ends its window once a process grew by 1 GiB (a lower bound then:
its growth per session is at least that over the sessions)."""


async def _median_rss(pids: dict[str, int]) -> dict[str, int]:
    samples: dict[str, list[int]] = {name: [] for name in pids}
    for _ in range(5):
        for name, pid in pids.items():
            samples[name].append(rss(pid))
        await asyncio.sleep(0.1)
    return {name: int(statistics.median(values)) for name, values in samples.items()}


async def _close_code(ws: ClientConnection, timeout_s: float) -> int | None:
    """Read what is left until the server's close frame; its code (None: not within bound)."""
    with contextlib.suppress(TimeoutError, ConnectionClosed):
        async with asyncio.timeout(timeout_s):
            async for _ in ws:
                pass
    return ws.close_code


async def _stall(
    bench: Bench,
    pids: dict[str, int],
    sockets: list[ClientConnection],
    start: list[Any],
    cap_bytes: int | None = None,
) -> tuple[dict[str, int], dict[str, int], str | None, RssSampler]:
    """(RSS before, peak RSS, the process that grew past ``cap_bytes`` and ended the window
    early if one did (the naive bridge buffers without bound: a machine with less memory than
    this one would swap or kill it before the window ends), the samples)."""
    before = await _median_rss(pids)
    for ws, message in zip(sockets, start, strict=True):
        await ws.send(message)
    capped: str | None = None
    with RssSampler(pids) as sampler:
        deadline = time.monotonic() + bench.profile.stall_window_s
        while capped is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            if cap_bytes is not None:
                capped = next((n for n in pids if sampler.peak[n] - before[n] > cap_bytes), None)
    return before, dict(sampler.peak), capped, sampler


async def run_stalled(bench: Bench) -> ScenarioResult:
    p = bench.profile
    k = p.stall_sessions
    result = ScenarioResult("stalled", 7, "Technicians who stop reading")
    first = p.command_agents + p.open_agents
    agents = bench.pool[first : first + k]
    sessions = [await bench.open_session(a) for a in agents]
    pids = {"api": bench.api_pid, "gateway": bench.gateway_pid}
    sockets = []
    for session_id in sessions:
        ticket = await bench.ticket(session_id)
        # max_queue=1: the client library itself stops reading at once
        sockets.append(await connect(bench.tech_ws_url(session_id, ticket), max_queue=1))
    command = json.dumps(
        {"type": "exec", "command": f"bench stream {ENDLESS} {STALL_CHUNK}", "timeout_s": 3600}
    )
    try:
        before, peak, _, sampler = await _stall(bench, pids, sockets, [command] * k)
        drain_s = min(3.0, p.stall_window_s)
        codes = await asyncio.gather(*(_close_code(ws, drain_s) for ws in sockets))
    finally:
        for ws in sockets:
            ws.transport.abort()  # no closing handshake with a reader that never read
        for agent in agents:
            await bench.close_session(agent.id)
    await asyncio.sleep(1)
    after = await _median_rss(pids)

    # the naive bridge, same number of stalled readers
    assert bench.bridge_api is not None
    assert bench.bridge_gw is not None
    bpids = {"api": bench.bridge_api.pid, "gateway": bench.bridge_gw.pid}
    names = bench.bridge_names[:k]
    bsockets = [await connect(bench.bridge_ws_url(name), max_queue=1) for name in names]
    try:
        bbefore, bpeak, bcapped, _ = await _stall(
            bench, bpids, bsockets, [f"stream {ENDLESS} {STALL_CHUNK}"] * k, BRIDGE_CAP_BYTES
        )
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                await bench.bridge_request(name, b"cancel")
        for ws in bsockets:
            ws.transport.abort()

    capped_note = (
        f"the bridge's window ended early, once its {bcapped} process grew by "
        f"{BRIDGE_CAP_BYTES >> 20} MiB: its figures are lower bounds"
        if bcapped
        else ""
    )

    def growth(peak_: dict[str, int], before_: dict[str, int], part: str) -> float:
        return mib(max(0, peak_[part] - before_[part]) / k)

    result.rows = [
        Row(
            "API memory growth per stalled session",
            "MiB",
            growth(peak, before, "api"),
            growth(bpeak, bbefore, "api"),
            "naive bridge's API process",
            Goal("<=", 4),
            capped_note,
        ),
        Row(
            "gateway memory growth per stalled session",
            "MiB",
            growth(peak, before, "gateway"),
            growth(bpeak, bbefore, "gateway"),
            "naive bridge's gateway process",
            Goal("<=", 4),
            capped_note,
        ),
    ]
    result.details = {
        "stalled_sessions": k,
        "window_s": p.stall_window_s,
        "rss_before": before,
        "rss_peak": peak,
        "rss_after": after,
        "close_codes_seen": [c for c in codes],
        "bridge_rss_before": bbefore,
        "bridge_rss_peak": bpeak,
        "bridge_window_capped_by": bcapped,
    }
    result.samples = {}
    for name, series in sampler.series.items():
        result.samples[f"{name} RSS MiB"] = [mib(v) for _, v in series]
        result.samples[f"{name} t"] = [t for t, _ in series]
    return result


async def run_files(bench: Bench) -> ScenarioResult:
    p = bench.profile
    result = ScenarioResult("files", 8, "File transfer through a session")
    size = p.file_bytes
    session_id = await bench.open_session(bench.pool[0])
    sha = await asyncio.to_thread(pattern_sha256, size)

    async def body() -> AsyncIterator[bytes]:
        for offset in range(0, size, 1 << 20):
            yield pattern_bytes(offset, min(1 << 20, size - offset))

    t0 = time.perf_counter()
    r = await bench.api.put(
        f"/tunnel/{session_id}/files",
        params={"path": "/bench/upload/file.bin", "overwrite": "true"},
        content=body(),
        headers={"Content-Length": str(size), "X-Content-SHA256": sha},
        timeout=600,
    )
    upload_s = time.perf_counter() - t0
    if r.status_code != 201:
        raise RuntimeError(f"upload failed: {r.status_code} {r.text[:300]}")

    digest = hashlib.sha256()
    received = 0
    t0 = time.perf_counter()
    async with bench.api.stream(
        "GET",
        f"/tunnel/{session_id}/files",
        params={"path": f"/bench/download/{size}"},
        timeout=600,
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"download failed: {response.status_code}")
        async for piece in response.aiter_raw():
            digest.update(piece)
            received += len(piece)
    download_s = time.perf_counter() - t0
    if received != size or digest.hexdigest() != sha:
        raise RuntimeError(f"download incomplete or corrupt: {received} of {size} bytes")

    reference = await bridge_stream(bench, bench.bridge_names[0], size, FILE_CHUNK_BYTES)
    ref_name = "naive bridge stream, 256 KiB frames"
    result.rows = [
        Row(
            f"upload of {mib(size):.0f} MiB",
            "MB/s",
            size / upload_s / 1e6,
            reference.mb_per_s,
            ref_name,
        ),
        Row(
            f"download of {mib(size):.0f} MiB",
            "MB/s",
            size / download_s / 1e6,
            reference.mb_per_s,
            ref_name,
        ),
    ]
    result.details = {
        "bytes": size,
        "upload_s": upload_s,
        "download_s": download_s,
        "sha256_verified": True,
        "bridge_reference_s": reference.seconds,
    }
    return result
