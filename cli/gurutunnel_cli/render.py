"""Rich tables for the listing commands (``--json`` bypasses them and prints the API's JSON)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table


def when(value: Any) -> str:
    """An API timestamp as ``YYYY-MM-DD HH:MM:SS`` (as sent, in its zone); ``-`` when unset."""
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(value)


def print_json(console: Console, body: Any) -> None:
    # plain print: machine-readable output must carry no colour codes or wrapping
    console.file.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
    console.file.flush()


def agents_table(body: dict[str, Any]) -> Table:
    table = Table("id", "name", "online", "last seen", "host", "os", title="agents")
    for agent in body.get("data", []):
        metrics = agent.get("metrics") or {}
        table.add_row(
            str(agent.get("id", "")),
            str(agent.get("name", "")),
            "[green]yes[/green]" if agent.get("online") else "[red]no[/red]",
            when(agent.get("last_seen_at")),
            str(metrics.get("hostname", "-")),
            " ".join(str(metrics[k]) for k in ("os", "os_release") if metrics.get(k)) or "-",
        )
    return table


def sessions_table(body: dict[str, Any]) -> Table:
    table = Table(
        "id",
        "agent",
        "technician",
        "state",
        "reason",
        "created",
        "opened",
        "closed",
        title=f"sessions ({body.get('count', 0)})",
    )
    for s in body.get("data", []):
        table.add_row(
            str(s.get("id", "")),
            str(s.get("agent_id", "")),
            str(s.get("tech_id", "")),
            str(s.get("state", "")),
            str(s.get("close_reason") or "-"),
            when(s.get("created_at")),
            when(s.get("opened_at")),
            when(s.get("closed_at")),
        )
    return table


def session_table(session: dict[str, Any]) -> Table:
    table = Table("field", "value", title=f"session {session.get('id', '')}")
    for key, value in session.items():
        text = when(value) if key.endswith("_at") else ("-" if value is None else str(value))
        table.add_row(key, text)
    return table
