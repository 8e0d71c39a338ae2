"""Heartbeat frames: agent liveness plus host metrics (heartbeat mode and tunnel mode)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .base import Frame


class HostMetrics(BaseModel):
    """A snapshot of the managed machine, as psutil sees it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    hostname: str = Field(max_length=255)
    os: str = Field(max_length=64, description="platform.system(), e.g. Linux, Windows, Darwin")
    os_release: str = Field(default="", max_length=128)
    agent_version: str = Field(default="", max_length=64)
    cpu_percent: float = Field(ge=0)
    cpu_count: int = Field(ge=0)
    mem_total_bytes: int = Field(ge=0)
    mem_used_percent: float = Field(ge=0, le=100)
    disk_total_bytes: int = Field(ge=0)
    disk_used_percent: float = Field(ge=0, le=100)
    boot_time: datetime
    load_avg: tuple[float, float, float] | None = None


class Heartbeat(Frame):
    """agent -> server: sent every ``heartbeat_interval_s`` in both modes."""

    type: Literal["heartbeat"] = "heartbeat"
    sent_at: datetime
    mode: Literal["heartbeat", "tunnel"]
    session_id: str | None = None
    metrics: HostMetrics
