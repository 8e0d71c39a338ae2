"""Terminal channel payloads: run a command, receive its output."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..ids import Id
from .base import Frame


class Terminal(Frame):
    """server -> agent: run ``command`` on the terminal channel ``channel_id``."""

    type: Literal["terminal.command"] = "terminal.command"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    command: str = Field(max_length=65536)


class TerminalOutput(Frame):
    """agent -> server: the whole result of a command."""

    type: Literal["terminal.output"] = "terminal.output"
    req_id: Id | None = None
    session_id: Id
    channel_id: Id
    stdout: str
    stderr: str
    exit_code: int | None
