"""The only place NATS subjects, stream names and queue groups are built.

Contract (default prefix ``gt``):

=====================================  =================================  ======================
subject                                publisher -> subscriber            pattern
=====================================  =================================  ======================
``gt.agent.<agent_id>.cmd``            api -> gateway holding the agent   request/reply
``gt.agent.<agent_id>.evt.<kind>``     gateway -> api (queue group)       pub/sub (heartbeats)
``gt.presence.<agent_id>``             gateway -> api                     JetStream (durable)
``gt.session.<session_id>.up``         gateway -> api / technicians       pub/sub, seq-numbered
``gt.session.<session_id>.down``       api -> gateway                     pub/sub
``gt.gateway.heartbeat``               gateway -> api                     pub/sub (lease)
``gt.gateway.control``                 api / gateways -> all gateways     pub/sub
=====================================  =================================  ======================

Every id is checked with :func:`gurutunnel_protocol.ids.validate_id` before it enters a subject,
and the prefix itself must be one or more such tokens joined by dots, so tests can give each run
its own namespace on a shared server (``t1a2b.gt``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .ids import validate_id

DEFAULT_PREFIX = "gt"

# Presence stream parameters. API and gateways both create the stream idempotently, so they
# must agree on them; they live here next to the stream's name.
PRESENCE_STREAM_MAX_AGE_S = 7 * 24 * 3600
PRESENCE_STREAM_DUPLICATE_WINDOW_S = 120


def _validate_prefix(prefix: str) -> str:
    tokens = prefix.split(".")
    for token in tokens:
        validate_id(token, what="subject prefix token")
    return prefix


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subject builders for one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        _validate_prefix(self.prefix)

    # agents
    def agent_commands(self, agent_id: str) -> str:
        return f"{self.prefix}.agent.{validate_id(agent_id, what='agent_id')}.cmd"

    def agent_events(self, agent_id: str, kind: str) -> str:
        agent = validate_id(agent_id, what="agent_id")
        return f"{self.prefix}.agent.{agent}.evt.{validate_id(kind, what='event kind')}"

    def event_kind(self, subject: str) -> str | None:
        """The ``kind`` of an :meth:`agent_events` subject of this prefix; None for any other
        subject (the subscriber of :meth:`all_agent_events` then checks the agent id against
        the payload's with :meth:`agent_events`)."""
        tokens = subject.split(".")
        head = self.prefix.count(".") + 1
        if (
            len(tokens) != head + 4
            or ".".join(tokens[:head]) != self.prefix
            or tokens[head] != "agent"
            or tokens[head + 2] != "evt"
        ):
            return None
        return tokens[-1]

    def all_agent_events(self) -> str:
        """Wildcard the API subscribes to (in its queue group) for every agent event."""
        return f"{self.prefix}.agent.*.evt.>"

    # presence
    def presence(self, agent_id: str) -> str:
        return f"{self.prefix}.presence.{validate_id(agent_id, what='agent_id')}"

    def all_presence(self) -> str:
        return f"{self.prefix}.presence.*"

    # sessions
    def session_up(self, session_id: str) -> str:
        return f"{self.prefix}.session.{validate_id(session_id, what='session_id')}.up"

    def up_session_id(self, subject: str) -> str | None:
        """The session id of a :meth:`session_up` subject of this prefix; None for any other
        subject (``session_down``, another prefix)."""
        head = f"{self.prefix}.session."
        if not (subject.startswith(head) and subject.endswith(".up")):
            return None
        session_id = subject[len(head) : -len(".up")]
        return session_id if session_id and "." not in session_id else None

    def all_sessions(self) -> str:
        """Wildcard over both directions of every session (taps and tests; no service uses it)."""
        return f"{self.prefix}.session.>"

    def session_down(self, session_id: str) -> str:
        return f"{self.prefix}.session.{validate_id(session_id, what='session_id')}.down"

    # gateways
    def gateway_heartbeat(self) -> str:
        return f"{self.prefix}.gateway.heartbeat"

    def gateway_control(self) -> str:
        """Core NATS broadcast to every gateway (``ControlMessage``: takeover notices).

        One subject for all agents on purpose: a gateway subscribes once, before it accepts a
        socket, so it hears every notice about any connection it may come to hold."""
        return f"{self.prefix}.gateway.control"

    # JetStream and queue groups
    @property
    def presence_stream(self) -> str:
        """JetStream stream capturing :meth:`all_presence` (stream names allow no dots)."""
        return f"{self.prefix.replace('.', '_').upper()}_PRESENCE"

    @property
    def presence_consumer(self) -> str:
        """Durable consumer name the API replicas share for presence events."""
        return "api-presence"

    @property
    def revocation_bucket(self) -> str:
        """JetStream key-value bucket: key agent_id -> ISO-8601 ``not_before`` of credentials."""
        return f"{self.prefix.replace('.', '_').upper()}_REVOKED"

    @property
    def api_queue(self) -> str:
        """Queue group of the API replicas for agent events and gateway heartbeats."""
        return f"{self.prefix.replace('.', '_')}-api"
