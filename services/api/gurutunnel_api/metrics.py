"""Prometheus metrics of the API, served at ``GET /metrics`` (see ``main.py``).

Contract:
- Every application owns one :class:`ApiMetrics` with its OWN ``CollectorRegistry`` (nothing in
  the library's global registry), so any number of apps live in one process (tests) without a
  duplicate-registration error. ``render(accept)`` returns the exposition (text format, or
  OpenMetrics when the scraper asks for it) and its content type, via ``prometheus_client``.
- Every name starts with ``gurutunnel_api_``. No label ever carries an agent id, session id,
  technician, token, path or command text: HTTP requests are labelled with the route TEMPLATE
  (``/api/v1/tunnel/status/{session_id}``; ``unmatched`` when no route matched), a known method
  (else ``other``) and the status class; outcomes are ``ErrorCode`` / ``ExitReason`` values or
  one of a few fixed words (anything else becomes ``other``). The number of series is bounded
  whatever clients send.
- Sessions by state and connected agents are read from the database when scraped
  (:meth:`ApiMetrics.refresh`: one transaction, two aggregate statements, bounded by a timeout).
  When the database does not answer, those series are left out and
  ``gurutunnel_api_database_up`` is 0. Every replica reports the same database-wide values:
  aggregate them with ``max``, not ``sum``.
- :class:`HttpMetricsMiddleware` times every HTTP request from its start to the end of its
  response body (a streamed response counts until its last byte); a request that ends without
  a response counts as ``5xx``. WebSockets are not timed.

Names (each counter also has the library's ``_created`` sample):

=================================================================  ==============================
``gurutunnel_api_http_request_duration_seconds{method,route,status_class}``  histogram
``gurutunnel_api_sessions{state}``                     sessions per state (scrape time)
``gurutunnel_api_agents_connected``                    agents online (scrape time)
``gurutunnel_api_database_up``                         1 when the scrape's query worked
``gurutunnel_api_tunnel_opens_total{outcome}``         ``opened`` or the error code
``gurutunnel_api_commands_total{outcome}``             commands by how they ended
``gurutunnel_api_presence_events_total{kind,outcome}`` presence events: handled/refused/failed
``gurutunnel_api_nats_reconnects_total``               NATS client reconnections
``gurutunnel_api_gateway_leases_lost_total``           gateway leases found expired
=================================================================  ==============================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages import ExitReason

from .agents.models import Agent
from .sessions.models import SessionState, TechSession

log = logging.getLogger(__name__)

PREFIX = "gurutunnel_api_"

HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Up to 5 minutes: a streamed command or a file transfer is timed to its last byte."""

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

OUTCOMES = frozenset(
    {"opened", "cancelled", "client_gone", "not_started", "database_unavailable", "other"}
    | {code.value for code in ErrorCode}
    | {reason.value for reason in ExitReason}
)
"""Every value an ``outcome`` label may take."""


def bounded_outcome(value: str) -> str:
    """``value`` when it is a known outcome, else ``other`` (the label set stays closed)."""
    return value if value in OUTCOMES else "other"


def outcome_of(exc: BaseException) -> str:
    """The outcome label of a failure: its ``ErrorCode`` when it carries one (``ApiError``,
    ``BusError``), ``cancelled``, ``database_unavailable`` or ``internal_error``."""
    code = getattr(exc, "code", None)
    if isinstance(code, ErrorCode):
        return code.value
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, sa_exc.SQLAlchemyError | OSError):
        return ErrorCode.DATABASE_UNAVAILABLE.value
    return ErrorCode.INTERNAL_ERROR.value


def route_template(scope: Scope) -> str:
    """The template of the route that matched (set by the router), never the raw path."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) else "unmatched"


@dataclass(frozen=True, slots=True)
class DatabaseSnapshot:
    """What the last scrape read from the database."""

    sessions: dict[str, int] = field(default_factory=dict)
    agents_online: int = 0


async def read_database(sessionmaker: async_sessionmaker[AsyncSession]) -> DatabaseSnapshot:
    """Sessions per state and online agents: one transaction, two aggregates (4 rows at most)."""
    async with sessionmaker() as db, db.begin():
        rows = (
            await db.execute(
                select(col(TechSession.state), func.count()).group_by(col(TechSession.state))
            )
        ).all()
        online = await db.scalar(
            select(func.count()).select_from(Agent).where(col(Agent.online).is_(True))
        )
    return DatabaseSnapshot(
        sessions={str(state): int(count) for state, count in rows}, agents_online=int(online or 0)
    )


class _DatabaseCollector:
    """Exports the last :class:`DatabaseSnapshot` (None: the database did not answer)."""

    def __init__(self) -> None:
        self.snapshot: DatabaseSnapshot | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(DatabaseSnapshot())

    def collect(self) -> Iterable[Metric]:
        return self._families(self.snapshot)

    @staticmethod
    def _families(snapshot: DatabaseSnapshot | None) -> list[Metric]:
        up = GaugeMetricFamily(
            PREFIX + "database_up",
            "1 when the last scrape could read sessions and agents from the database, else 0.",
            value=1 if snapshot is not None else 0,
        )
        if snapshot is None:
            return [up]
        sessions = GaugeMetricFamily(
            PREFIX + "sessions",
            "Tunnel sessions per state, from the database (the same on every replica).",
            labels=["state"],
        )
        for state in SessionState:
            sessions.add_metric([state.value], snapshot.sessions.get(state.value, 0))
        agents = GaugeMetricFamily(
            PREFIX + "agents_connected",
            "Agents online (connected to some gateway), from the database.",
            value=snapshot.agents_online,
        )
        return [up, sessions, agents]


class ApiMetrics:
    """The metrics of one application; increment points are methods (see the module contract)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._database = _DatabaseCollector()
        self.registry.register(self._database)
        self._http = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP requests from start to the last byte of the response, by route template.",
            ["method", "route", "status_class"],
            buckets=HTTP_BUCKETS_S,
            registry=self.registry,
        )
        self._tunnel_opens = Counter(
            PREFIX + "tunnel_opens",
            "Tunnel open requests by outcome (opened, or the error code answered).",
            ["outcome"],
            registry=self.registry,
        )
        self._commands = Counter(
            PREFIX + "commands",
            "Commands (REST and WebSocket) that got an audit row, by how they ended.",
            ["outcome"],
            registry=self.registry,
        )
        self._presence = Counter(
            PREFIX + "presence_events",
            "Presence events from the stream: handled, refused (undecodable) or failed (retried).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self._nats_reconnects = Counter(
            PREFIX + "nats_reconnects",
            "Reconnections of the API's NATS client.",
            registry=self.registry,
        )
        self._leases_lost = Counter(
            PREFIX + "gateway_leases_lost",
            "Gateway leases found expired (their sessions are closed).",
            registry=self.registry,
        )

    # ------------------------------------------------------------------ increment points

    def observe_http(self, method: str, route: str, status: int, duration_s: float) -> None:
        self._http.labels(
            method=method if method in _METHODS else "other",
            route=route,
            status_class=_STATUS_CLASSES.get(status // 100, "other"),
        ).observe(duration_s)

    def tunnel_open(self, outcome: str) -> None:
        self._tunnel_opens.labels(outcome=bounded_outcome(outcome)).inc()

    @contextlib.contextmanager
    def counting_tunnel_open(self) -> Iterator[None]:
        """Count the block as one open: ``opened`` when it returns, else its failure."""
        try:
            yield
        except BaseException as exc:
            self.tunnel_open(outcome_of(exc))
            raise
        self.tunnel_open("opened")

    def command_finished(self, outcome: str) -> None:
        """A command's audit row was completed with ``outcome`` (exit reason or error code)."""
        self._commands.labels(outcome=bounded_outcome(outcome)).inc()

    def presence_event(self, kind: str, outcome: str) -> None:
        """``kind`` is the event type (``presence.connected``...) or ``unknown``."""
        self._presence.labels(kind=kind, outcome=outcome).inc()

    def nats_reconnected(self) -> None:
        self._nats_reconnects.inc()

    def lease_lost(self) -> None:
        """A gateway's lease was found expired (call once per expired lease)."""
        self._leases_lost.inc()

    # ------------------------------------------------------------------ exposition

    async def refresh(
        self, sessionmaker: async_sessionmaker[AsyncSession], *, timeout_s: float
    ) -> None:
        """Read the scrape-time gauges from the database (bounded by ``timeout_s``)."""
        try:
            self._database.snapshot = await asyncio.wait_for(read_database(sessionmaker), timeout_s)
        except Exception as exc:
            log.warning("metrics: database unavailable", extra={"error": type(exc).__name__})
            self._database.snapshot = None

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for a scraper sending ``Accept: accept``: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class HttpMetricsMiddleware:
    """Pure ASGI middleware timing HTTP requests (see the module contract); streaming-safe."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts

        async def send_timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            # the router wrote the matched route into this same scope on the way in
            self.metrics.observe_http(
                scope["method"], route_template(scope), status, time.perf_counter() - started
            )
