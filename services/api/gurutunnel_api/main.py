"""The FastAPI application: ``create_app(settings)`` and the lifespan owning engine and bus.

Startup: build the engine, load the agent signing key (when configured; an unreadable key fails
startup), connect the bus and start its consumers (a NATS that cannot be reached fails startup
with ``BusUnavailable``), start the stale-pending sweeper, the session-limit reaper and the
gateway lease reaper (after the bus subscribed: its grace counts from then).
Shutdown: cancel them and the background tasks of work inside sessions, stop the bus
(bounded drain), dispose the engine. ``/readyz`` answers 503 ``bus_unavailable`` while
NATS is disconnected or the durable presence consumer is down (close path 1 would be dead);
``/healthz`` answers 503 ``bus_unavailable`` once the NATS client gave up reconnecting (a finite
``nats_max_reconnect_attempts`` spent), so the liveness probe restarts the process.
``/metrics`` is the Prometheus exposition of this app's :class:`.metrics.ApiMetrics` (own
registry; HTTP requests timed by :class:`.metrics.HttpMetricsMiddleware`); it needs no token.
When the root logger has no handler yet, ``create_app`` installs the JSON log handler
(``serve`` installs it through uvicorn's log config, for uvicorn's loggers too).
Schema migrations are not run here: ``gurutunnel-api serve --migrate`` (default) or
``gurutunnel-api migrate`` does that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gurutunnel_protocol import ErrorCode

from .agents.events import handle_agent_heartbeat, handle_gateway_heartbeat
from .agents.leases import run_lease_reaper
from .agents.router import router as agents_router
from .audit.router import router as audit_router
from .auth.router import router as auth_router
from .auth.router import users_router
from .bus import BusHandlers, NatsBus
from .config import ApiSettings
from .db import make_engine, make_sessionmaker, ping
from .errors import error_response, install_error_handlers
from .files.router import router as files_router
from .logs import configure_logging
from .metrics import ApiMetrics, HttpMetricsMiddleware
from .security import PasswordHashing, load_agent_signing_key
from .sessions.events import handle_presence
from .sessions.router import router as sessions_router
from .sessions.sweeper import run_sweeper
from .work.limits import run_reaper
from .work.router import router as work_router
from .work.service import WorkContext, cancel_and_wait

log = logging.getLogger(__name__)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """Build the application; settings come from ``GT_API_*`` when not given."""
    settings = settings or ApiSettings()  # jwt_secret comes from the env
    metrics = ApiMetrics()  # this app's own registry: many apps may live in one process

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings)
        sessionmaker = make_sessionmaker(engine)
        key = (
            load_agent_signing_key(settings.agent_signing_key_file)
            if settings.agent_signing_key_file
            else None
        )
        bus = NatsBus(
            settings,
            BusHandlers(
                on_presence=partial(handle_presence, sessionmaker),
                on_agent_heartbeat=partial(handle_agent_heartbeat, sessionmaker),
                on_gateway_heartbeat=partial(handle_gateway_heartbeat, sessionmaker),
            ),
            metrics=metrics,
        )
        try:
            await bus.start()
        except BaseException:
            await bus.close()
            await engine.dispose()
            raise
        app.state.engine = engine
        app.state.sessionmaker = sessionmaker
        app.state.bus = bus
        app.state.agent_signing_key = key
        work = WorkContext(settings=settings, bus=bus, sessionmaker=sessionmaker, metrics=metrics)
        app.state.work = work
        loops = [
            asyncio.create_task(
                run_sweeper(sessionmaker, bus=bus, settings=settings), name="pending-sweeper"
            ),
            asyncio.create_task(
                run_reaper(sessionmaker, bus=bus, settings=settings), name="session-reaper"
            ),
            asyncio.create_task(
                run_lease_reaper(
                    sessionmaker, bus=bus, settings=settings, on_lease_lost=metrics.lease_lost
                ),
                name="lease-reaper",
            ),
        ]
        try:
            yield
        finally:
            await cancel_and_wait(loops, settings.request_timeout_s, what="service loops")
            await work.background.close(settings.request_timeout_s)
            await bus.close()
            await engine.dispose()

    if not logging.getLogger().handlers:
        configure_logging(settings.log_level)
    app = FastAPI(title="gurutunnel API", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.state.passwords = PasswordHashing(settings.password_hash_concurrency)
    install_error_handlers(app)
    app.include_router(auth_router)
    app.include_router(users_router)
    app.include_router(agents_router)
    app.include_router(sessions_router)
    app.include_router(work_router)
    app.include_router(files_router)
    app.include_router(audit_router)

    @app.get("/healthz", tags=["health"], response_model=None)
    async def healthz(request: Request) -> dict[str, str] | JSONResponse:
        """Alive (the process answers), unless its NATS client gave up reconnecting: then 503,
        so the liveness probe restarts the process (readiness alone would not)."""
        bus: NatsBus | None = getattr(request.app.state, "bus", None)
        if bus is not None and bus.gave_up:
            return error_response(
                503,
                ErrorCode.BUS_UNAVAILABLE,
                "NATS connection closed for good (reconnect budget spent); restart me",
            )
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=None)
    async def readyz(request: Request) -> dict[str, str] | JSONResponse:
        """Ready when the database answers and NATS is connected; else 503 with the reason."""
        try:
            await asyncio.wait_for(ping(request.app.state.engine), settings.request_timeout_s)
        except Exception as exc:
            log.warning("readiness: database unavailable", extra={"error": type(exc).__name__})
            return error_response(503, ErrorCode.DATABASE_UNAVAILABLE, "database unavailable")
        bus: NatsBus = request.app.state.bus
        if not bus.connected:
            return error_response(503, ErrorCode.BUS_UNAVAILABLE, "message bus unavailable")
        if not bus.presence_healthy:
            return error_response(
                503, ErrorCode.BUS_UNAVAILABLE, "presence consumer unavailable (being recreated)"
            )
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus exposition. No token: it holds no secret and no id (label values are
        route templates, states and codes); keep it on the pod network, off the ingress."""
        await metrics.refresh(request.app.state.sessionmaker, timeout_s=settings.request_timeout_s)
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return app
