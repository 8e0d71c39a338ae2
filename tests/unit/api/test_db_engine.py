"""The SQLite engine's connection settings (the embedded default's durability and locking)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from sqlalchemy import text

from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine

SECRET = "s" * 40
SYNCHRONOUS_LEVELS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


async def _pragmas(settings: ApiSettings) -> tuple[str, str, int]:
    engine = make_engine(settings)
    try:
        async with engine.connect() as conn:
            journal = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            level = (await conn.execute(text("PRAGMA synchronous"))).scalar_one()
            foreign_keys = (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one()
    finally:
        await engine.dispose()
    return journal, SYNCHRONOUS_LEVELS[level], foreign_keys


async def test_sqlite_runs_in_wal_with_synchronous_normal_by_default(tmp_path: Path) -> None:
    settings = ApiSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'api.db'}", jwt_secret=SECRET
    )
    assert await _pragmas(settings) == ("wal", "NORMAL", 1)


@pytest.mark.parametrize("level", ["FULL", "NORMAL"])
async def test_sqlite_synchronous_follows_the_setting(
    tmp_path: Path, level: Literal["FULL", "NORMAL"]
) -> None:
    settings = ApiSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'api.db'}",
        jwt_secret=SECRET,
        sqlite_synchronous=level,
    )
    assert (await _pragmas(settings))[1] == level


def test_an_unknown_synchronous_level_is_refused() -> None:
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        ApiSettings(jwt_secret=SECRET, sqlite_synchronous="OFF")
