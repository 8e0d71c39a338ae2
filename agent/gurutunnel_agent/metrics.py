"""Host metrics for heartbeats: a psutil snapshot as a :class:`HostMetrics`.

Contract: ``collect_host_metrics()`` is synchronous and quick (``cpu_percent(interval=None)``
compares with the previous call instead of sleeping); the client still runs it in a worker thread
under ``metrics_timeout_s`` because ``disk_usage`` can hang on a dead mount. Values are clamped
to the ranges ``HostMetrics`` declares so a psutil oddity never makes a heartbeat invalid.
``minimal_host_metrics()`` is the fallback while no collection ever finished: host identity,
memory and boot time (procfs reads that a dead mount cannot hang), CPU load and disk reported
as 0, and no ``disk_usage`` call.
"""

from __future__ import annotations

import os
import platform
import socket
from datetime import UTC, datetime
from functools import cache
from importlib import metadata

import psutil

from gurutunnel_protocol.messages import HostMetrics


@cache
def agent_version() -> str:
    try:
        return metadata.version("gurutunnel-agent")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _system_root() -> str:
    if platform.system() == "Windows":
        return os.environ.get("SYSTEMDRIVE", "C:") + "\\"
    return "/"


def _percent(value: float) -> float:
    return min(max(float(value), 0.0), 100.0)


def prime_cpu_percent() -> None:
    """Start psutil's CPU measurement so the first heartbeat reports a real figure."""
    psutil.cpu_percent(interval=None)


def collect_host_metrics() -> HostMetrics:
    """A snapshot of this machine (blocking calls only of bounded, sub-millisecond kind)."""
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(_system_root())
    load_avg: tuple[float, float, float] | None = None
    if hasattr(os, "getloadavg"):
        one, five, fifteen = os.getloadavg()
        load_avg = (max(one, 0.0), max(five, 0.0), max(fifteen, 0.0))
    return HostMetrics(
        hostname=socket.gethostname()[:255],
        os=platform.system()[:64],
        os_release=platform.release()[:128],
        agent_version=agent_version()[:64],
        cpu_percent=max(float(psutil.cpu_percent(interval=None)), 0.0),
        cpu_count=psutil.cpu_count() or 0,
        mem_total_bytes=int(mem.total),
        mem_used_percent=_percent(mem.percent),
        disk_total_bytes=int(disk.total),
        disk_used_percent=_percent(disk.percent),
        boot_time=datetime.fromtimestamp(psutil.boot_time(), tz=UTC),
        load_avg=load_avg,
    )


def minimal_host_metrics() -> HostMetrics:
    """A snapshot without the disk (for when ``collect_host_metrics`` hangs or fails)."""
    mem = psutil.virtual_memory()
    return HostMetrics(
        hostname=socket.gethostname()[:255],
        os=platform.system()[:64],
        os_release=platform.release()[:128],
        agent_version=agent_version()[:64],
        cpu_percent=0.0,
        cpu_count=os.cpu_count() or 0,
        mem_total_bytes=int(mem.total),
        mem_used_percent=_percent(mem.percent),
        disk_total_bytes=0,
        disk_used_percent=0.0,
        boot_time=datetime.fromtimestamp(psutil.boot_time(), tz=UTC),
    )
