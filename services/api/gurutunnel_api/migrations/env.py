"""Alembic environment: migrates on a connection handed over by ``upgrade_database``.

SQLite runs in batch mode (``render_as_batch``) because it cannot ALTER most constraints.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from gurutunnel_api.models import metadata

config = context.config


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations with `gurutunnel-api migrate` (upgrade_database)")
    run_migrations(connection)
