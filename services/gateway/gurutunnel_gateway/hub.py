"""Which agents are connected to this gateway replica.

Contract:
- At most one *current* connection per agent: ``register`` of a second connection of the same
  agent makes it current and closes the older one with ``CloseCode.REPLACED`` (disconnect
  reason ``replaced``). Only the current connection forwards the agent's commands; a connection
  registers only once its command subscription is flushed, so a current connection always
  answers (``current`` is how a closing connection learns whether to stay silent).
- ``live`` connections include replaced ones that are still closing; shutdown, revocation and the
  pending-request sweep (which answers expired requests ``agent_timeout``) act on all of them.
- Across gateways the order is the stream sequence of each connection's ``presence.connected``
  (docs/design.md "Takeover across gateways"): ``takeover`` hands a ``ConnectionTakeover``
  notice to this replica's current connection of that agent, which closes itself
  ``REPLACED`` when the notice is newer than it and ignores it otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from gurutunnel_protocol import CloseCode
from gurutunnel_protocol.messages import ConnectionTakeover, DisconnectReason

if TYPE_CHECKING:
    from .connection import AgentConnection


class Hub:
    """agent_id -> current connection, plus every live connection of this replica."""

    def __init__(self) -> None:
        self._current: dict[str, AgentConnection] = {}
        self._live: set[AgentConnection] = set()

    def register(self, conn: AgentConnection) -> AgentConnection | None:
        """Make ``conn`` the agent's current connection; close and return the one it replaced."""
        old = self._current.get(conn.agent_id)
        self._current[conn.agent_id] = conn
        self._live.add(conn)
        if old is not None and old is not conn:
            old.close(
                CloseCode.REPLACED, DisconnectReason.REPLACED, "replaced by a newer connection"
            )
            return old
        return None

    def unregister(self, conn: AgentConnection) -> None:
        """Forget ``conn``; the agent's newer connection, if any, stays current."""
        self._live.discard(conn)
        if self._current.get(conn.agent_id) is conn:
            del self._current[conn.agent_id]

    def is_current(self, conn: AgentConnection) -> bool:
        return self._current.get(conn.agent_id) is conn

    def current(self, agent_id: str) -> AgentConnection | None:
        return self._current.get(agent_id)

    def live(self) -> Iterator[AgentConnection]:
        """A snapshot of every live connection (safe to close them while iterating)."""
        return iter(list(self._live))

    def takeover(self, notice: ConnectionTakeover) -> bool:
        """Apply a takeover notice; True when it superseded a connection of this replica.

        Only the current connection needs it: older local ones are already closing (replaced
        here), and they stay silent while a newer one is current or superseded (see
        ``AgentConnection``)."""
        conn = self._current.get(notice.agent_id)
        if conn is None:
            return False
        return conn.on_takeover(notice)

    def revoke(self, agent_id: str, not_before: datetime) -> int:
        """Close (4501) the connections of ``agent_id`` whose credential predates ``not_before``."""
        closed = 0
        for conn in self.live():
            if conn.agent_id == agent_id and conn.identity.issued_at < not_before:
                conn.close(CloseCode.REVOKED, DisconnectReason.REVOKED, "agent revoked")
                closed += 1
        return closed

    async def sweep(self, now: float) -> int:
        """Answer ``agent_timeout`` to expired pending requests of every connection; how many."""
        return sum([await conn.expire_pending(now) for conn in self.live()])

    @property
    def agent_count(self) -> int:
        return len(self._current)

    @property
    def pending_requests(self) -> int:
        """Requests forwarded to agents and not answered yet, over every live connection."""
        return sum(conn.pending_requests for conn in self._live)
