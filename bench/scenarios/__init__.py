"""The eight scenarios of issue 5, in the order they run; ``--only`` takes these names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..harness import Bench
from ..results import ScenarioResult
from .fleet import run_idle, run_storm
from .opening import run_open
from .roundtrip import run_roundtrip, run_throughput
from .stalled import run_files, run_stalled
from .stream import run_stream

Scenario = Callable[[Bench], Awaitable[ScenarioResult]]

SCENARIOS: dict[str, tuple[int, str, Scenario]] = {
    "roundtrip": (1, "Command round trip", run_roundtrip),
    "throughput": (2, "Commands per second through one gateway", run_throughput),
    "open": (3, "Tunnel open", run_open),
    "stream": (4, "Streamed output of a session", run_stream),
    "idle": (5, "Idle agents: memory and heartbeat CPU", run_idle),
    "storm": (6, "Reconnect storm", run_storm),
    "stalled": (7, "Technicians who stop reading", run_stalled),
    "files": (8, "File transfer", run_files),
}
