"""Connection-level frames between a gateway and its agent: welcome, errors, reconnect hints."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..errors import ErrorCode
from ..ids import Id
from .base import Frame


class Welcome(Frame):
    """server -> agent: first frame after the upgrade; the identity the gateway authenticated."""

    type: Literal["welcome"] = "welcome"
    agent_id: Id
    conn_id: Id
    gateway_id: Id
    heartbeat_interval_s: float = Field(gt=0)


class ErrorFrame(Frame):
    """server -> agent: a frame the agent sent was refused; the connection goes on."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str = Field(max_length=1024)
    req_id: Id | None = None


class Reconnect(Frame):
    """server -> agent: reconnect (to any gateway) after ``delay_ms``; sent before a drain."""

    type: Literal["reconnect"] = "reconnect"
    delay_ms: int = Field(ge=0)
    reason: str = Field(default="draining", max_length=64)
