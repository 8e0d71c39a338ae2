"""SQLite's write lock: which units of work take it (``db.begin()``), which do not
(``unlocked``), and a connection never goes back to the pool holding it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine, make_sessionmaker, unlocked

SECRET = "s" * 40


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    settings = ApiSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'api.db'}",
        jwt_secret=SECRET,
        sqlite_busy_timeout_s=0.3,
    )
    engine = make_engine(settings)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (x INTEGER NOT NULL)"))
        await conn.execute(text("INSERT INTO t (x) VALUES (1)"))
    try:
        yield engine
    finally:
        await engine.dispose()


async def _holding_the_write_lock(
    sm: async_sessionmaker[AsyncSession], locked: asyncio.Event, release: asyncio.Event
) -> None:
    async with sm() as db, db.begin():
        await db.execute(text("UPDATE t SET x = 2"))
        locked.set()
        await release.wait()


async def test_an_unlocked_read_does_not_wait_for_a_writer_holding_the_lock(
    engine: AsyncEngine,
) -> None:
    """While a writer holds BEGIN IMMEDIATE, an ``unlocked`` read answers at once (the last
    committed value) where a ``db.begin()`` read runs into the busy timeout."""
    sm = make_sessionmaker(engine)
    locked, release = asyncio.Event(), asyncio.Event()
    writer = asyncio.create_task(_holding_the_write_lock(sm, locked, release))
    try:
        await asyncio.wait_for(locked.wait(), 5)
        async with sm() as db, unlocked(db):
            seen = await asyncio.wait_for(db.scalar(text("SELECT x FROM t")), 0.2)
        assert seen == 1
        with pytest.raises(OperationalError, match="locked"):
            async with sm() as db, db.begin():
                await db.scalar(text("SELECT x FROM t"))
    finally:
        release.set()
        await writer


async def test_an_unlocked_lone_write_waits_for_the_lock_and_commits(
    engine: AsyncEngine,
) -> None:
    """A single write statement without BEGIN takes the lock itself once the writer commits."""
    sm = make_sessionmaker(engine)
    locked, release = asyncio.Event(), asyncio.Event()
    writer = asyncio.create_task(_holding_the_write_lock(sm, locked, release))
    await asyncio.wait_for(locked.wait(), 5)
    asyncio.get_running_loop().call_later(0.1, release.set)
    async with sm() as db, unlocked(db):
        await db.execute(text("UPDATE t SET x = x + 10"))
    await writer
    async with sm() as db, unlocked(db):
        assert await db.scalar(text("SELECT x FROM t")) == 12


async def test_a_connection_returned_inside_a_transaction_is_rolled_back(
    engine: AsyncEngine,
) -> None:
    """The pool skips the reset round trip only when the driver has no transaction open: one
    left open behind SQLAlchemy's back is rolled back on return, releasing the write lock."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        await driver.execute("BEGIN IMMEDIATE")
        await driver.execute("UPDATE t SET x = 3")
        assert driver.in_transaction
    assert not driver.in_transaction
    sm = make_sessionmaker(engine)
    async with sm() as db, db.begin():
        assert await db.scalar(text("SELECT x FROM t")) == 1
        await db.execute(text("UPDATE t SET x = 4"))
