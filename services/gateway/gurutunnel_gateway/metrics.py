"""Prometheus metrics of one gateway replica, served at ``GET /metrics`` (see ``server.py``).

Contract:
- Every :class:`GatewayMetrics` owns its OWN ``CollectorRegistry``: nothing is registered in the
  library's global registry, so any number of gateways live in one process (tests) without a
  duplicate-registration error. ``render(accept)`` returns the exposition (text format, or
  OpenMetrics when the scraper asks for it) and its content type, via ``prometheus_client``.
- Every name starts with ``gurutunnel_gateway_``. No label ever carries an agent id, connection
  id, session id, credential or frame content: the label values are small closed sets
  (``direction``, ``outcome``, HTTP ``status``, close ``code``, disconnect ``reason``), so the
  number of series is bounded whatever the agents send.
- The hot path (every frame between an agent and the gateway) costs two integer additions on
  :class:`Traffic`; the counters are read from it at scrape time, with no lock, no label lookup
  and no string formatting per frame. (A ``prometheus_client.Counter`` takes a mutex per
  ``inc``: cheap, but the gateway is single-threaded asyncio and needs none.)
- Connected agents and pending requests are gauges read from the hub at scrape time.

Names (each counter also has the library's ``_created`` sample):

========================================================  =====================================
``gurutunnel_gateway_agents_connected``                    agents with a current socket here
``gurutunnel_gateway_agent_upgrades_total{outcome,status}``  upgrades accepted (101) / refused
``gurutunnel_gateway_connections_closed_total{code,reason}``  agent sockets ended
``gurutunnel_gateway_frames_total{direction}``              frames agent->gateway (``in``) and
                                                           gateway->agent (``out``)
``gurutunnel_gateway_frame_bytes_total{direction}``         their payload sizes
``gurutunnel_gateway_pending_requests``                     requests waiting for an agent answer
``gurutunnel_gateway_nats_reconnects_total``                NATS client reconnections
``gurutunnel_gateway_lease_losses_total``                   times this gateway found its lease
                                                           lost and dropped its agents
``gurutunnel_gateway_gc_collections_total{kind}``           full garbage collections the
                                                           gateway ran (``recent``, ``deep``;
                                                           see ``collector.py``)
``gurutunnel_gateway_gc_pause_seconds_total{kind}``         the loop time they took
========================================================  =====================================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from gurutunnel_protocol import CloseCode

PREFIX = "gurutunnel_gateway_"

# RFC 6455 section 7.4.1 codes (1000-1015) and gurutunnel's own; an agent may close with any
# code in 1000-4999, so anything else is reported as "other" to keep the label set closed.
_KNOWN_CLOSE_CODES: dict[int, str] = {
    **{code: str(code) for code in range(1000, 1016)},
    **{int(code): str(int(code)) for code in CloseCode},
}


def close_code_label(code: int | None) -> str:
    """The ``code`` label of a close: the number when it is a known code, else ``other``;
    ``none`` when no close code is known."""
    if code is None:
        return "none"
    return _KNOWN_CLOSE_CODES.get(code, "other")


class Traffic:
    """Frames and payload bytes between agents and this gateway (plain counters, hot path).

    ``in`` is agent -> gateway, ``out`` gateway -> agent. Sizes are the lengths of the frames'
    payloads as sent (characters of a text frame: JSON, ASCII but for rare non-ASCII strings,
    so bytes in practice), not counting WebSocket framing."""

    __slots__ = ("bytes_in", "bytes_out", "frames_in", "frames_out")

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0


class HubView(Protocol):
    """What the scrape reads from the hub."""

    @property
    def agent_count(self) -> int: ...

    @property
    def pending_requests(self) -> int: ...


class _ScrapeTimeCollector:
    """Exports :class:`Traffic` and the hub's gauges, read when scraped."""

    def __init__(self, traffic: Traffic, hub: HubView | None) -> None:
        self._traffic = traffic
        self._hub = hub

    def describe(self) -> Iterable[Metric]:
        # names only (the registry checks them for duplicates); values are read in collect()
        return self._families(Traffic(), None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._traffic, self._hub)

    @staticmethod
    def _families(traffic: Traffic, hub: HubView | None) -> list[Metric]:
        frames = CounterMetricFamily(
            PREFIX + "frames",
            "WebSocket frames between agents and this gateway (in: from agents, out: to agents).",
            labels=["direction"],
        )
        frames.add_metric(["in"], traffic.frames_in)
        frames.add_metric(["out"], traffic.frames_out)
        sizes = CounterMetricFamily(
            PREFIX + "frame_bytes",
            "Payload bytes of the frames between agents and this gateway.",
            labels=["direction"],
        )
        sizes.add_metric(["in"], traffic.bytes_in)
        sizes.add_metric(["out"], traffic.bytes_out)
        agents = GaugeMetricFamily(
            PREFIX + "agents_connected",
            "Agents with a current WebSocket on this gateway.",
            value=hub.agent_count if hub is not None else 0,
        )
        pending = GaugeMetricFamily(
            PREFIX + "pending_requests",
            "Requests forwarded to agents and not answered yet.",
            value=hub.pending_requests if hub is not None else 0,
        )
        return [frames, sizes, agents, pending]


class GatewayMetrics:
    """The metrics of one gateway; increment points are methods (see the module contract)."""

    def __init__(self, hub: HubView | None = None) -> None:
        self.registry = CollectorRegistry()
        self.traffic = Traffic()
        self.registry.register(_ScrapeTimeCollector(self.traffic, hub))
        self._upgrades = Counter(
            PREFIX + "agent_upgrades",
            "Agent WebSocket upgrades: accepted (status 101) or refused (401, 403, 503).",
            ["outcome", "status"],
            registry=self.registry,
        )
        self._closed = Counter(
            PREFIX + "connections_closed",
            "Agent WebSockets that ended, by close code and disconnect reason.",
            ["code", "reason"],
            registry=self.registry,
        )
        self._nats_reconnects = Counter(
            PREFIX + "nats_reconnects",
            "Reconnections of the gateway's NATS client.",
            registry=self.registry,
        )
        self._lease_losses = Counter(
            PREFIX + "lease_losses",
            "Times this gateway found its lease lost and dropped its agent sockets.",
            registry=self.registry,
        )
        self._gc_collections = Counter(
            PREFIX + "gc_collections",
            "Full garbage collections the gateway ran: recent objects, or deep (everything).",
            ["kind"],
            registry=self.registry,
        )
        self._gc_pause = Counter(
            PREFIX + "gc_pause_seconds",
            "Event-loop time the gateway's full garbage collections took.",
            ["kind"],
            registry=self.registry,
        )
        self._accepted = self._upgrades.labels(outcome="accepted", status="101")

    # ------------------------------------------------------------------ increment points

    def upgrade_accepted(self) -> None:
        self._accepted.inc()

    def upgrade_refused(self, status: int) -> None:
        """An upgrade answered with an HTTP error ``status`` (a few fixed values)."""
        self._upgrades.labels(outcome="refused", status=str(int(status))).inc()

    def connection_closed(self, code: int | None, reason: str) -> None:
        """An agent socket ended; ``reason`` is a ``DisconnectReason`` value (a closed set)."""
        self._closed.labels(code=close_code_label(code), reason=reason).inc()

    def nats_reconnected(self) -> None:
        self._nats_reconnects.inc()

    def lease_lost(self) -> None:
        """The gateway learned its lease expired and closes its sockets (``LEASE_LOST``)."""
        self._lease_losses.inc()

    def gc_collection(self, *, deep: bool, seconds: float) -> None:
        kind = "deep" if deep else "recent"
        self._gc_collections.labels(kind=kind).inc()
        self._gc_pause.labels(kind=kind).inc(seconds)

    # ------------------------------------------------------------------ exposition

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for a scraper sending ``Accept: accept``: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
