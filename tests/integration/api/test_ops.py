"""Migrations, health and readiness, and the database-down answer."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gurutunnel_api.config import ApiSettings
from gurutunnel_api.db import make_engine
from gurutunnel_api.migrations import upgrade_database
from gurutunnel_api.models import metadata
from tests.support.services import NatsProcess, free_port

from .conftest import JWT_SECRET, Api, Users, enroll, running_api, wait_until


def _schema_diff(connection: sa.Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def _index_names(connection: sa.Connection) -> set[str]:
    return {ix["name"] for ix in sa.inspect(connection).get_indexes("tech_session") if ix["name"]}


async def test_migrations_reach_head_twice_and_match_the_models(api_settings: ApiSettings) -> None:
    """upgrade head builds the schema the models describe (incl. the partial unique index) and
    running it again changes nothing."""
    await upgrade_database(api_settings)
    await upgrade_database(api_settings)
    engine = make_engine(api_settings)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
            assert "uq_tech_session_agent_open" in await conn.run_sync(_index_names)
            version = await conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
            assert version == "0005"
    finally:
        await engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_healthz_and_readyz_answer_200_when_database_and_nats_are_up(api: Api) -> None:
    """Both probes answer 200 on a healthy service."""
    assert (await api.client.get("/healthz")).status_code == 200
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200, ready.text


async def test_database_down_answers_503_database_unavailable(
    nats_url: str, subject_prefix: str, nc: object
) -> None:
    """No database: readyz and requests answer 503 database_unavailable, bounded in time."""
    settings = ApiSettings(
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing",
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        jwt_secret=JWT_SECRET,
        request_timeout_s=1.0,
    )
    async with running_api(settings) as api:
        ready = await api.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "database_unavailable"
        token = await api.client.post(
            "/api/v1/auth/token", json={"username": "admin", "password": "whatever"}
        )
        assert token.status_code == 503
        assert token.json() == {
            "error": {"code": "database_unavailable", "message": "database unavailable"}
        }


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_nats_outage_answers_503_bus_unavailable_and_fails_the_open(
    migrated: ApiSettings, users: Users
) -> None:
    """With its NATS server gone, readyz and opens answer 503 bus_unavailable and the session
    is failed rather than left pending."""
    server = NatsProcess()
    server.start()
    try:
        settings = migrated.model_copy(
            update={"nats_url": server.url, "subject_prefix": "outage.gt"}
        )
        async with running_api(settings) as api:
            agent = await enroll(api, users.admin)
            server.stop()

            async def bus_down() -> bool:
                return (await api.client.get("/readyz")).status_code == 503

            await wait_until(bus_down, what="readyz to report the outage")
            assert (await api.client.get("/readyz")).json()["error"]["code"] == "bus_unavailable"
            resp = await api.client.post(
                "/api/v1/tunnel/open", json={"agent_id": agent.id}, headers=users.tech.headers
            )
            assert resp.status_code == 503
            assert resp.json()["error"]["code"] == "bus_unavailable"
            rows = (
                await api.client.get("/api/v1/tunnel/sessions", headers=users.tech.headers)
            ).json()["data"]
            assert [(r["state"], r["close_reason"]) for r in rows] == [
                ("failed", "bus_unavailable")
            ]
    finally:
        server.cleanup()
