"""Database engine, session factory and the column types every table shares.

Contract:
- ``make_engine(settings)`` builds the one async engine of the process, with
  ``hide_parameters=True`` (a logged or raised database error never carries bound parameters
  such as password hashes). PostgreSQL (asyncpg) gets a bounded connect/command timeout and
  pre-ping; SQLite (aiosqlite) gets WAL, ``synchronous`` from the settings (``NORMAL`` by
  default), a busy timeout, ``foreign_keys=ON`` and ``BEGIN IMMEDIATE`` for every transaction,
  so concurrent writers queue on the lock instead of failing with "database is locked" at
  upgrade time. A connection goes back to SQLite's pool without a ``ROLLBACK`` round trip
  unless the driver reports a transaction still open.
- Services open every unit of work with ``async with db.begin():`` so no transaction outlives
  its block (with ``BEGIN IMMEDIATE`` an idle open transaction would hold SQLite's write lock).
- ``async with unlocked(db):`` opens a unit of work that is ONE statement, or reads that need
  no common snapshot: on SQLite it emits no ``BEGIN`` (each statement is its own transaction;
  a read never waits for the write lock, a lone write statement takes it itself, under the
  busy timeout); on PostgreSQL it is ``db.begin()``. Never use it for two writes that must
  commit together.
- ``UTCDateTime`` stores instants in UTC and always returns timezone-aware ``datetime`` values,
  on both databases.
- ``SQLModel.metadata`` carries a naming convention so constraints have stable names in
  migrations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState
from sqlmodel import SQLModel

from .config import ApiSettings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION


def utcnow() -> datetime:
    """The current instant, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC instant on PostgreSQL and SQLite alike."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime refused: use timezone-aware UTC")
        value = value.astimezone(UTC)
        # SQLite has no time zone type; store naive UTC so text comparisons order correctly
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


SQLITE_BEGIN_OPTION: Final = "gurutunnel_sqlite_begin"
"""Connection execution option read by SQLite's ``begin`` listener: False emits no ``BEGIN``."""

UNLOCKED_OPTIONS: Final[dict[str, Any]] = {SQLITE_BEGIN_OPTION: False}


@asynccontextmanager
async def unlocked(db: AsyncSession) -> AsyncIterator[AsyncSession]:
    """A unit of work of one statement, or of reads needing no common snapshot (see the
    module contract); ``db`` must have no transaction in progress."""
    async with db.begin():
        await db.connection(execution_options=UNLOCKED_OPTIONS)
        yield db


def _is_sqlite(url: str) -> bool:
    return sa.make_url(url).get_backend_name() == "sqlite"


def make_engine(settings: ApiSettings) -> AsyncEngine:
    """The async engine for ``settings.database_url`` with the per-backend safety settings."""
    url = settings.database_url
    if _is_sqlite(url):
        engine = create_async_engine(
            url,
            connect_args={"timeout": settings.sqlite_busy_timeout_s},
            pool_timeout=settings.request_timeout_s,
            # the "reset" listener below rolls back only what is still open
            pool_reset_on_return=None,
            hide_parameters=True,
        )
        _configure_sqlite(
            engine,
            busy_timeout_s=settings.sqlite_busy_timeout_s,
            synchronous=settings.sqlite_synchronous,
        )
        return engine
    connect_args: dict[str, Any] = {}
    if sa.make_url(url).get_driver_name() == "asyncpg":
        connect_args = {
            "timeout": settings.request_timeout_s,
            "command_timeout": settings.request_timeout_s,
        }
    return create_async_engine(
        url,
        connect_args=connect_args,
        pool_pre_ping=True,
        pool_size=settings.db_pool_size,
        pool_timeout=settings.request_timeout_s,
        hide_parameters=True,
    )


def _configure_sqlite(engine: AsyncEngine, *, busy_timeout_s: float, synchronous: str) -> None:
    # SQLAlchemy's documented recipe: take transaction control away from the driver, then emit
    # our own BEGIN. IMMEDIATE takes the write lock up front, so two writers serialise on the
    # busy timeout instead of deadlocking on a read-to-write lock upgrade.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        if conn.get_execution_options().get(SQLITE_BEGIN_OPTION, True):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    # An ORM session commits, then returns its connection: the pool's default reset would add
    # a ROLLBACK (one driver thread round trip) to every unit of work. The driver knows
    # whether a transaction is still open; only then is a rollback needed.
    @event.listens_for(engine.sync_engine, "reset")
    def _on_reset(
        dbapi_connection: Any, record: ConnectionPoolEntry, state: PoolResetState
    ) -> None:
        if state.terminate_only or not state.asyncio_safe:
            return  # the pool closes it (or cannot await here); nothing is reused
        driver = record.driver_connection
        if driver is None or getattr(driver, "in_transaction", True):
            dbapi_connection.rollback()


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (responses are built after it)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def ping(engine: AsyncEngine) -> None:
    """Run ``SELECT 1``; raises the driver's error when the database does not answer."""
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
