"""``python -m bench`` (``python3 dev.py bench``): run the scenarios and write the results.

Exit code 0 when every selected scenario completed (whether or not its goals were met: the
table says that), 1 when one failed to run, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import baseline, simagent
from .harness import API_ENV, GATEWAY_ENV, Bench
from .machine import library_versions, machine_info
from .profiles import PROFILES, Profile
from .report import fmt, write_json, write_markdown
from .results import ScenarioResult
from .sampling import py_spy
from .scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent

SCENARIO_TIMEOUT_S = {"full": 420.0, "quick": 60.0, "smoke": 60.0}
"""Bound of one scenario: past it the scenario is recorded as failed and the run goes on."""
RUN_BUDGET_S = {"full": 20 * 60.0, "quick": 120.0, "smoke": 100.0}
"""Bound of the whole run (issue 5: 20 minutes full, 2 minutes quick): a scenario gets at most
what is left of it, less ``STOP_RESERVE_S`` to stop everything; once it is spent, the scenarios
not run yet are recorded as failed."""
STOP_RESERVE_S = 10.0
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dev.py bench", description=__doc__)
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true", help="the quick profile (<= 2 min)")
    level.add_argument(
        "--smoke",
        action="store_true",
        help="the quick profile's smallest size of each scenario, in shorter windows (the "
        "harness test)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"run only these scenarios: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--docs",
        type=Path,
        help="write the table (and the plots, in a benchmarks/ folder beside it) into this file; "
        "default: docs/benchmarks.md, for a complete full run on SQLite without profiler only",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write any table")
    parser.add_argument("--no-plots", action="store_true", help="no PNG plots (no matplotlib)")
    parser.add_argument(
        "--profile",
        choices=["gateway", "api"],
        action="append",
        default=[],
        help="run that process under pyinstrument; the text profile goes to the results dir",
    )
    parser.add_argument(
        "--sample",
        choices=["gateway", "api"],
        action="append",
        default=[],
        help="sample that process (every gateway for 'gateway') with py-spy, the GIL holder "
        "only, without pausing it; stacks and a summary go to the results dir",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run's temp dir and logs")
    parser.add_argument(
        "--postgres",
        metavar="SERVER_URL",
        help="run the API on PostgreSQL instead of SQLite: postgresql://user@host:port/db of a "
        "server where the run creates (and drops) a database of its own",
    )
    args = parser.parse_args(argv)
    if args.sample and py_spy() is None:
        parser.error("--sample needs py-spy (pip install -r requirements-bench.txt)")
    return args


def settings_used(profile: Profile, profiled: list[str]) -> dict[str, Any]:
    from gurutunnel_api.config import ApiSettings
    from gurutunnel_gateway.config import GatewaySettings

    where = {"host", "port", "nats_url", "database_url"}
    gateway = GatewaySettings(agent_public_key="unused").model_dump(
        mode="json", exclude={"agent_public_key", "agent_public_key_file", "gateway_id"} | where
    )
    api = ApiSettings(jwt_secret="x" * 32).model_dump(
        mode="json", exclude={"jwt_secret", "agent_signing_key_file"} | where
    )
    return {
        "profile": dataclasses.asdict(profile),
        "profiled": sorted(profiled),
        "bench_overrides": {"api": API_ENV, "gateway": GATEWAY_ENV},
        "database": "SQLite file in the run's temp dir (the embedded default)",
        "gateway": gateway,
        "api": api,
        "simulated_agent": {
            "backoff_initial_s": simagent.BACKOFF_INITIAL_S,
            "backoff_max_s": simagent.BACKOFF_MAX_S,
            "backoff_factor": simagent.BACKOFF_FACTOR,
            "backoff_reset_after_s": simagent.BACKOFF_RESET_AFTER_S,
            "ping_interval_s": simagent.AGENT_PING_INTERVAL_S,
            "ping_timeout_s": simagent.AGENT_PING_TIMEOUT_S,
            "file_chunk_bytes": simagent.FILE_CHUNK_BYTES,
            "file_window_bytes": simagent.FILE_WINDOW_BYTES,
            "compression": "websockets default (permessage-deflate), as the real agent",
            "output": "pseudo-random bytes (incompressible)",
        },
        "baselines": {
            "bridge_gateway": "websockets server, max_size 1 MiB, pings 10 s, no compression "
            "(the gateway's defaults)",
            "bridge_api": "bare ASGI app under uvicorn (uvloop, httptools), no framework",
            "bare": "websockets server holding sockets, max_size 1 MiB, pings 10 s, no compression",
            "server_event_loop": "asyncio" if baseline.SERVER_LOOP is None else "uvloop",
            "server_listen_backlog": baseline.LISTEN_BACKLOG,
            "ping_interval_s": baseline.PING_INTERVAL_S,
        },
    }


async def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` on ``server_url``; the API's SQLAlchemy URL of it."""
    import asyncpg

    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = server_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def drop_database(server_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _console_table(result: ScenarioResult) -> Table:
    table = Table(title=f"{result.number}. {result.title}", title_justify="left")
    for column in ("metric", "gurutunnel", "baseline", "ratio", "goal", "result"):
        table.add_column(
            column, justify="right" if column in {"gurutunnel", "baseline"} else "left"
        )
    for row in result.rows:
        verdict = (
            "info"
            if row.goal is None
            else {True: "pass", False: "[red]FAIL", None: "n/a"}[row.passed]
        )
        table.add_row(
            row.metric,
            fmt(row.gurutunnel, row.unit),
            fmt(row.baseline, row.unit),
            f"{row.ratio:#.3g}x" if row.ratio is not None else "—",
            row.goal.text(row.unit) if row.goal else "—",
            verdict,
        )
    return table


async def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Start the processes, run the selected scenarios, stop everything; the results."""
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    selected = args.only or list(SCENARIOS)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    root = Path(tempfile.mkdtemp(prefix="gt-bench-"))
    console.rule(f"gurutunnel benchmarks: {profile.name} profile, {', '.join(selected)}")
    document: dict[str, Any] = {
        "schema": 1,
        "profile": profile.name,
        "started_at": started.isoformat(),
        "machine": machine_info(),
        "versions": library_versions(),
        "settings": settings_used(profile, [*args.profile, *args.sample]),
        "selected": selected,
        "scenarios": {},
    }
    database_url = None
    if args.postgres:
        database_url = await create_database(args.postgres, f"gt_bench_{stamp.lower()}")
        document["settings"]["database"] = "PostgreSQL (--postgres), a fresh database"
    bench = Bench(
        profile,
        root,
        console,
        profile_parts=frozenset(args.profile),
        profile_dir=args.results_dir / f"{stamp}-profiles",
        database_url=database_url,
        sample_parts=frozenset(args.sample),
    )
    failed = False
    t_start = time.monotonic()
    try:
        with console.status("starting NATS, API, gateway, simulated agents and the bridge ..."):
            await bench.start()
        console.log(f"stack up in {time.monotonic() - t_start:.1f} s (logs in {root / 'logs'})")
        for name in selected:
            number, title, scenario = SCENARIOS[name]
            t0 = time.monotonic()
            left_s = RUN_BUDGET_S[profile.name] - STOP_RESERVE_S - (t0 - t_start)
            with console.status(f"{number}. {title} ..."):
                try:
                    if left_s <= 0:
                        raise TimeoutError(
                            f"the run's budget of {RUN_BUDGET_S[profile.name]:g} s is spent"
                        )
                    result = await asyncio.wait_for(
                        scenario(bench), min(SCENARIO_TIMEOUT_S[profile.name], left_s)
                    )
                except Exception as exc:
                    failed = True
                    detail = f"{type(exc).__name__}: {exc}"
                    console.log(f"[red]{number}. {title} failed: {detail}")
                    console.log(traceback.format_exc())
                    result = ScenarioResult(name, number, title, error=detail[:500])
            result.duration_s = time.monotonic() - t0
            document["scenarios"][name] = result.to_json()
            if not result.error:
                console.print(_console_table(result))
            console.log(f"{number}. {title}: {result.duration_s:.1f} s")
    finally:
        with console.status("stopping everything ..."):
            await bench.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        if args.postgres:
            await drop_database(args.postgres, f"gt_bench_{stamp.lower()}")
    document["finished_at"] = datetime.now(UTC).isoformat()
    document["duration_s"] = time.monotonic() - t_start
    document["load_avg_at_end"] = list(os.getloadavg())

    document["failed"] = failed
    document["stamp"] = stamp
    return document


def complete_run(document: dict[str, Any]) -> bool:
    """A full-profile run of every scenario on SQLite (the embedded default the page
    describes), all of them completed, no process profiled: what docs/benchmarks.md holds (a
    partial run there would replace its table with a few rows)."""
    return (
        document["profile"] == "full"
        and str(document["settings"].get("database", "")).startswith("SQLite")
        and set(document["selected"]) == set(SCENARIOS)
        and not document["failed"]
        and not document["settings"].get("profiled")
    )


def write_outputs(args: argparse.Namespace, document: dict[str, Any], console: Console) -> None:
    """The JSON file, then (unless turned off) the plots and the table: into ``--docs`` when
    given, into docs/benchmarks.md for a :func:`complete_run`, else the plots beside the JSON."""
    out = args.results_dir / f"{document['stamp']}.json"
    write_json(document, out)
    console.log(f"results: {out}")
    docs: Path | None = None
    if not args.no_docs:
        docs = args.docs or (DEFAULT_DOCS if complete_run(document) else None)
        if docs is None:
            console.log(
                "docs/benchmarks.md left as it is: it holds complete full runs only "
                "(--docs PATH writes this run's table elsewhere)"
            )
    plots: list[str] = []
    if not args.no_plots:
        from .plots import make_plots

        plot_dir = (
            docs.parent / "benchmarks" if docs else args.results_dir / f"{document['stamp']}-plots"
        )
        for path in make_plots(document, plot_dir):
            plots.append(os.path.relpath(path, docs.parent) if docs else str(path))
        console.log(f"plots: {', '.join(plots) or 'none'}")
    if docs is not None:
        write_markdown(document, docs, plots)
        console.log(f"table written into {docs}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    simagent.raise_nofile_limit()
    console = Console()
    try:
        document = asyncio.run(run(args, console))
    except KeyboardInterrupt:
        return 130
    write_outputs(args, document, console)
    return 1 if document["failed"] else 0
