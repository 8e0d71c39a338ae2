"""Sizes of every scenario for the three profiles: ``full`` (<= 20 min on 2 cores), ``quick``
(<= 2 min) and ``smoke`` (the quick profile's smallest size of each scenario, in shorter windows,
its fleets spread over several client processes as the full profile's are: the harness test,
``tests/bench``).

Every count and duration a scenario uses is here, so one place says what each profile does and
every scenario is bounded in time and count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

ProfileName = Literal["full", "quick", "smoke"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class Profile:
    name: ProfileName
    # 1 round trip
    rt_agents: int
    """Agents (with a session each) the round trips rotate over: the gateway rate-limits each
    connection's control frames (200/s), which one agent answering back to back would exceed."""
    rt_samples: int
    rt_rest_samples: int
    rt_warmup: int
    # 2 throughput
    tp_in_flight: int
    tp_duration_s: float
    """Measured time of each side, split over ``tp_rounds`` windows."""
    tp_warmup_s: float
    """Unmeasured time before each window."""
    tp_rounds: int
    """Windows per side, the two sides alternating: a change of the machine's load during the
    run falls on both sides alike."""
    # 3 open
    open_agents: int
    open_samples: int
    # 4 stream
    stream_bytes: int
    stream_sessions: int
    stream_bytes_each: int
    # 5 idle agents
    idle_steps: list[int]
    idle_settle_s: float
    idle_cpu_window_s: float
    idle_connect_timeout_s: float
    # 6 reconnect storm
    storm_agents: int
    storm_timeout_s: float
    storm_probe_rate_per_s: float
    # 7 stalled technician
    stall_sessions: int
    stall_window_s: float
    # 8 files
    file_bytes: int
    # processes
    agents_per_client_process: int = 4500
    idle_heartbeat_interval_s: float = 30.0
    """The idle gateway's ``agent_heartbeat_interval_s`` (the product's default in full): the CPU
    window must see beats, and quick's and smoke's windows are shorter than 30 s."""
    idle_heartbeat_fast_s: float = 5.0
    """The interval of the second CPU window at the largest size (the agents told to beat
    faster): the CPU a heartbeat costs is the difference between the two windows."""
    sim_processes: int = 2
    """Processes for the pool of API-enrolled agents (scenarios 1-4, 7, 8)."""
    interleave_block: int = 50
    """Round trips run in interleaved blocks (gurutunnel, bridge, REST, ...) so noise from other
    work on the machine falls on every side alike."""

    @property
    def pool_size(self) -> int:
        """Enrolled agents: commands/streams/files, then opens, then stalled sessions."""
        return self.command_agents + self.open_agents + self.stall_sessions

    @property
    def command_agents(self) -> int:
        return max(self.rt_agents, self.tp_in_flight, self.stream_sessions, 1)


FULL = Profile(
    name="full",
    rt_agents=16,
    rt_samples=3000,
    rt_rest_samples=1500,
    rt_warmup=100,
    tp_in_flight=64,
    tp_duration_s=12.0,
    tp_warmup_s=0.5,
    tp_rounds=4,
    open_agents=4,
    open_samples=400,
    stream_bytes=64 * MIB,
    stream_sessions=20,
    stream_bytes_each=8 * MIB,
    idle_steps=[1000, 5000, 10000, 18000],
    idle_settle_s=3.0,
    idle_cpu_window_s=20.0,
    idle_connect_timeout_s=240.0,
    storm_agents=10000,
    storm_timeout_s=150.0,
    storm_probe_rate_per_s=50.0,
    stall_sessions=20,
    stall_window_s=20.0,
    file_bytes=200 * MIB,
)

QUICK = Profile(
    name="quick",
    rt_agents=8,
    rt_samples=300,
    rt_rest_samples=150,
    rt_warmup=30,
    tp_in_flight=64,
    tp_duration_s=2.0,
    tp_warmup_s=0.5,
    tp_rounds=2,
    open_agents=2,
    open_samples=60,
    stream_bytes=8 * MIB,
    stream_sessions=20,
    stream_bytes_each=4 * MIB,
    idle_steps=[500, 1500],
    idle_settle_s=1.0,
    idle_cpu_window_s=2.0,
    idle_connect_timeout_s=60.0,
    idle_heartbeat_interval_s=1.0,
    idle_heartbeat_fast_s=0.25,
    storm_agents=1000,
    storm_timeout_s=40.0,
    storm_probe_rate_per_s=50.0,
    stall_sessions=4,
    stall_window_s=6.0,
    file_bytes=16 * MIB,
)

SMOKE = dataclasses.replace(
    QUICK,
    name="smoke",
    # the quick profile's sizes, its smallest where it has several; shorter windows
    idle_steps=QUICK.idle_steps[:1],
    tp_duration_s=0.5,
    tp_warmup_s=0.2,
    tp_rounds=1,
    idle_settle_s=0.5,
    idle_cpu_window_s=1.0,
    stall_window_s=2.0,
    # the spread of a fleet over client processes (4,500 sockets each in full) is exercised too
    agents_per_client_process=250,
)

PROFILES: dict[ProfileName, Profile] = {"full": FULL, "quick": QUICK, "smoke": SMOKE}
