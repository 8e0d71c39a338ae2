"""``gurutunnel``: the technician's command line (typer + rich).

Commands: ``login``, ``agents``, ``sessions``, ``open``, ``close``, ``status``, ``exec``,
``shell``, ``put``, ``get``. Settings come from the environment only when a command runs
(``GT_CLI_API_URL``, ``GT_CLI_TOKEN``, ``XDG_CONFIG_HOME``; see ``credentials``).

Exit codes: 0 success; 1 an API error (``gurutunnel: <code>: <message>`` on stderr) or a
network error (naming the URL); 2 bad usage; 3 no valid token ("run gurutunnel login");
``exec`` and ``shell`` exit with the remote command's code (timeout 124, cancelled 130,
spawn_failed 127, session_closed 255, killed by signal N 128+N); ``put``/``get`` print
``<path> <size> <sha256>`` on stdout (progress bars on stderr) and exit 130 on Ctrl-C, saying
what was kept for a resume. Never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from . import credentials, render
from .client import ApiClient
from .errors import EXIT_CANCELLED, CliError
from .files import FileTransfer, TransferProgress
from .remote_exec import ExecRequest, ExecRunner
from .shell import LocalTerminal, run_shell

T = TypeVar("T")

app = typer.Typer(
    name="gurutunnel",
    help="Work on managed machines through gurutunnel sessions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]


def _stdout() -> Console:
    console = Console()
    if not console.is_terminal:
        # piped output: no wrapping of ids at an assumed 80 columns
        console = Console(width=200)
    return console


def _stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _run(
    work: Callable[[], Coroutine[Any, Any, T]],
    on_interrupt: Callable[[], str] | None = None,
) -> T:
    """Run one command's coroutine; any ``CliError`` becomes one stderr line and its exit code.

    Ctrl-C prints ``on_interrupt()`` (what the command left behind) or just "interrupted".
    """
    try:
        return asyncio.run(work())
    except CliError as exc:
        _stderr(exc.render())
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _stderr(f"gurutunnel: {on_interrupt() if on_interrupt else 'interrupted'}")
        raise typer.Exit(EXIT_CANCELLED) from None


def _client() -> ApiClient:
    creds = credentials.resolve(os.environ)
    return ApiClient(creds.api_url, creds.token)


async def _call(method: Callable[[ApiClient], Awaitable[T]]) -> T:
    async with _client() as client:
        return await method(client)


# ---------------------------------------------------------------------------- login
@app.command()
def login(
    username: Annotated[str, typer.Option("--username", "-u", help="Technician user name.")],
    api: Annotated[
        str | None, typer.Option("--api", help="API base URL, e.g. http://127.0.0.1:8080.")
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
) -> None:
    """Get a token and store it (0600) in $XDG_CONFIG_HOME/gurutunnel/credentials.json."""
    api_url = (api or credentials.default_api_url(os.environ)).rstrip("/")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True)
    if not password:
        _stderr("gurutunnel: usage: empty password")
        raise typer.Exit(2)

    async def work() -> credentials.Credentials:
        async with ApiClient(api_url, None) as client:
            body = await client.login(username, password)
        expires = datetime.now(UTC) + timedelta(seconds=int(body.get("expires_in", 0)))
        return credentials.Credentials(api_url, str(body["access_token"]), expires)

    creds = _run(work)
    path = credentials.save(creds, os.environ)
    expiry = creds.expires_at.isoformat(timespec="seconds") if creds.expires_at else "?"
    _stderr(f"logged in to {api_url} as {username}; token valid until {expiry} ({path})")


# ---------------------------------------------------------------------------- listings
@app.command()
def agents(json_out: JsonFlag = False) -> None:
    """List agents: id, name, online, last seen, host, os."""
    body: dict[str, Any] = _run(lambda: _call(lambda c: c.agents()))
    console = _stdout()
    if json_out:
        render.print_json(console, body)
    else:
        console.print(render.agents_table(body))


@app.command()
def sessions(
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only this agent's sessions.")
    ] = None,
    state: Annotated[
        str | None, typer.Option("--state", help="pending, active, closed or failed.")
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """List tunnel sessions."""
    body: dict[str, Any] = _run(lambda: _call(lambda c: c.sessions(agent_id=agent, state=state)))
    console = _stdout()
    if json_out:
        render.print_json(console, body)
    else:
        console.print(render.sessions_table(body))


@app.command("open")
def open_session(agent_id: Annotated[str, typer.Argument(help="The agent's id.")]) -> None:
    """Open a session; prints its id alone on stdout (details on stderr)."""
    body: dict[str, Any] = _run(lambda: _call(lambda c: c.open_session(agent_id)))
    _stderr(
        f"session {body['id']} {body.get('state')} on agent {body.get('agent_id')} "
        f"(gateway {body.get('gateway_id')})"
    )
    sys.stdout.write(f"{body['id']}\n")


@app.command("close")
def close_session(session_id: Annotated[str, typer.Argument(help="The session's id.")]) -> None:
    """Close a session (idempotent)."""
    body: dict[str, Any] = _run(lambda: _call(lambda c: c.close_session(session_id)))
    sys.stdout.write(f"{body['id']} {body.get('state')} ({body.get('close_reason') or '-'})\n")


@app.command()
def status(
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    json_out: JsonFlag = False,
) -> None:
    """Show one session."""
    body: dict[str, Any] = _run(lambda: _call(lambda c: c.session_status(session_id)))
    console = _stdout()
    if json_out:
        render.print_json(console, body)
    else:
        console.print(render.session_table(body))


# ---------------------------------------------------------------------------- exec, shell
@app.command("exec")
def exec_command(
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    argv: Annotated[
        list[str] | None, typer.Argument(help="The program and its arguments, after --.")
    ] = None,
    sh: Annotated[
        str | None, typer.Option("--sh", help="Run this command line in the agent's shell.")
    ] = None,
    cwd: Annotated[str | None, typer.Option("--cwd", help="Working directory.")] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0.001, max=86400, help="Seconds before the agent kills it."),
    ] = None,
) -> None:
    """Run a command (no shell unless --sh); its output streams here, its exit code is ours."""
    try:
        request = ExecRequest(argv=argv or None, command=sh, cwd=cwd, timeout_s=timeout)
    except CliError as exc:
        _stderr(exc.render())
        raise typer.Exit(2) from None

    async def work() -> int:
        async with _client() as client:
            runner = ExecRunner(client, session_id, sys.stdout.buffer, sys.stderr.buffer)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, runner.request_cancel)
            try:
                return await runner.run(request)
            finally:
                loop.remove_signal_handler(signal.SIGINT)

    raise typer.Exit(_run(work))


@app.command()
def shell(session_id: Annotated[str, typer.Argument(help="The session's id.")]) -> None:
    """An interactive shell on the agent (raw terminal; ends with the shell's exit code)."""

    async def work() -> int:
        async with _client() as client:
            return await run_shell(client, session_id, LocalTerminal())

    raise typer.Exit(_run(work))


# ---------------------------------------------------------------------------- put, get
OverwriteFlag = Annotated[
    bool, typer.Option("--overwrite", help="Replace the destination if it exists.")
]


def _transfer(session_id: str) -> FileTransfer:
    return FileTransfer(session_id, TransferProgress(Console(stderr=True)), _stderr)


@app.command()
def put(
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    local_path: Annotated[Path, typer.Argument(help="The local file to upload.")],
    remote_path: Annotated[str, typer.Argument(help="Absolute path on the agent.")],
    overwrite: OverwriteFlag = False,
) -> None:
    """Upload a file, SHA-256 verified; after an interruption the same command resumes it."""
    transfer = _transfer(session_id)

    async def work() -> str:
        async with _client() as client:
            result = await transfer.put(client, local_path, remote_path, overwrite=overwrite)
        return result.line()

    line = _run(work, transfer.interrupted_message)
    sys.stdout.write(f"{line}\n")


@app.command()
def get(
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    remote_path: Annotated[str, typer.Argument(help="Absolute path on the agent.")],
    local_path: Annotated[Path, typer.Argument(help="Where to write it (via LOCAL_PATH.gtpart).")],
    overwrite: OverwriteFlag = False,
) -> None:
    """Download a file, SHA-256 verified; after an interruption the same command resumes it."""
    transfer = _transfer(session_id)

    async def work() -> str:
        async with _client() as client:
            result = await transfer.get(client, remote_path, local_path, overwrite=overwrite)
        return result.line()

    line = _run(work, transfer.interrupted_message)
    sys.stdout.write(f"{line}\n")
