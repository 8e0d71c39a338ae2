"""``gurutunnel-api``: serve, migrate, create-admin, keygen.

Every command reads its settings from ``GT_API_*``; errors end with a one-line message and a
non-zero exit code, never a stack trace.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from .config import ApiSettings

app = typer.Typer(help="gurutunnel API service", no_args_is_help=True, add_completion=False)


def _settings() -> ApiSettings:
    try:
        return ApiSettings()  # jwt_secret comes from the env
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
        typer.echo(f"invalid settings (GT_API_*): {fields}", err=True)
        raise typer.Exit(2) from None


def _migrate(settings: ApiSettings) -> None:
    from .migrations import upgrade_database

    try:
        asyncio.run(upgrade_database(settings))
    except Exception as exc:
        typer.echo(f"migration failed: {type(exc).__name__}: {exc}"[:500], err=True)
        raise typer.Exit(1) from None


def _ensure_sqlite_dir(settings: ApiSettings) -> None:
    from sqlalchemy import make_url

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


@app.command()
def serve(
    migrate: Annotated[bool, typer.Option("--migrate/--no-migrate", help="migrate first")] = True,
) -> None:
    """Run the API with uvicorn (host and port from GT_API_HOST / GT_API_PORT)."""
    import uvicorn

    from .logs import uvicorn_log_config

    settings = _settings()
    _ensure_sqlite_dir(settings)
    if migrate:
        _migrate(settings)
    uvicorn.run(
        "gurutunnel_api.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        # tokens travel in headers only, but keep request lines out of the log anyway
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        # uvicorn offers it by default; here a setting (see ApiSettings.ws_per_message_deflate)
        ws_per_message_deflate=settings.ws_per_message_deflate,
        # root, uvicorn and uvicorn.error all write JSON through gurutunnel_api.logs
        log_config=uvicorn_log_config(settings.log_level),
    )


@app.command("migrate")
def migrate_cmd() -> None:
    """Upgrade the database to the newest schema (alembic upgrade head)."""
    settings = _settings()
    _ensure_sqlite_dir(settings)
    _migrate(settings)
    typer.echo("database is at head")


@app.command("create-admin")
def create_admin(
    username: Annotated[str, typer.Option(help="admin user name")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin")
    ] = False,
) -> None:
    """Create the admin, or reset its password and role (idempotent). Password from
    ``--password-stdin`` or ``GT_ADMIN_PASSWORD``."""
    from .auth.models import Role
    from .auth.service import upsert_technician
    from .db import make_engine, make_sessionmaker
    from .security import PasswordHashing

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = os.environ.get("GT_ADMIN_PASSWORD", "")
    if not password:
        typer.echo("no password: use --password-stdin or GT_ADMIN_PASSWORD", err=True)
        raise typer.Exit(2)
    if not 1 <= len(username) <= 64:
        typer.echo("username must be 1-64 characters", err=True)
        raise typer.Exit(2)
    settings = _settings()

    async def run() -> None:
        engine = make_engine(settings)
        try:
            async with make_sessionmaker(engine)() as db:
                await upsert_technician(
                    db,
                    passwords=PasswordHashing(settings.password_hash_concurrency),
                    username=username,
                    password=password,
                    role=Role.ADMIN,
                )
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except Exception as exc:
        typer.echo(f"create-admin failed: {type(exc).__name__}"[:500], err=True)
        raise typer.Exit(1) from None
    typer.echo(f"admin {username!r} is ready")


@app.command()
def keygen(
    private: Annotated[Path, typer.Option("--private", help="private key PEM to write")],
    public: Annotated[Path, typer.Option("--public", help="public key PEM to write")],
) -> None:
    """Write a new Ed25519 key pair for agent credentials (refuses to overwrite)."""
    from .security import generate_agent_keypair

    for path in (private, public):
        if path.exists():
            typer.echo(f"{path} exists; refusing to overwrite", err=True)
            raise typer.Exit(1)
    private_pem, public_pem = generate_agent_keypair()
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_pem)
        with public.open("xb") as fh:
            fh.write(public_pem)
    except OSError as exc:
        typer.echo(f"cannot write key: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {private} (private, 0600) and {public}")
