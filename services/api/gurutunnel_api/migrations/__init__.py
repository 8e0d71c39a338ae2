"""Alembic migrations shipped inside the package, so an installed API can migrate itself.

``upgrade_database(url)`` runs ``alembic upgrade head`` on one connection of the API's own
engine (same SQLite pragmas as the service), from inside a running event loop.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

from ..config import ApiSettings
from ..db import make_engine

SCRIPT_LOCATION = "gurutunnel_api:migrations"


def alembic_config() -> Config:
    """A programmatic Alembic config pointing at the packaged scripts (no alembic.ini)."""
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    return cfg


def _upgrade(connection: Connection, cfg: Config, revision: str) -> None:
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def upgrade_database(settings: ApiSettings, revision: str = "head") -> None:
    """Bring the database of ``settings`` to ``revision`` (idempotent)."""
    engine = make_engine(settings)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade, alembic_config(), revision)
    finally:
        await engine.dispose()
