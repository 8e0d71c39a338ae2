"""The lease reaper: close path 2 of "No orphaned session", judged on this API's own clock.

Contract (docs/design.md "Gateway leases"):
- The lease of a gateway's ``boot_id`` is live until ``renewed_at + lease_ttl_s``, where
  ``renewed_at`` is when an API handled its last heartbeat (see :mod:`.events`). A lease renewed
  before this process started is judged from its start instead (heartbeats sent while no API
  listened were lost, not missed): it expires at ``max(renewed_at, started_at) + lease_ttl_s``.
  The same holds after a round failed because the database did not answer: heartbeats handled
  meanwhile could not be recorded (lost, not missed), so the next round moves ``started_at``
  to its own start and every gateway gets a whole TTL to beat again (a database outage longer
  than the TTL must not declare healthy gateways lost).
  A round runs whether or not this API's own NATS connection is up: ``renewed_at`` is shared
  through the database, so while other replicas hear the heartbeats nothing expires, and with
  every API cut off from the bus no session can carry data anyway (the gateways, cut off too,
  fence themselves after the same TTL). A gateway wrongly declared lost (an API-only partition,
  a pause) hears of it from its next heartbeat: the API answers a heartbeat of a lost boot with
  ``GatewayLeaseLost`` on ``gateway.control`` and the gateway fences itself (closes its agent
  sockets 4002, takes a new boot), so no socket keeps serving a session the API closed.
- Every ``lease_reap_interval_s`` one round (:meth:`LeaseReaper.reap`):
  1. marks each expired live lease lost (``lost_boot_id = boot_id``, ``lost_at``) with one
     conditional UPDATE (the boot and ``renewed_at`` it read, not lost yet): a heartbeat handled
     meanwhile wins, and of several API replicas exactly one makes the transition. The same
     transaction marks offline the agents whose current connection is on that gateway boot.
     From then on heartbeats of that boot change nothing; a new boot starts a fresh lease.
  2. closes every ``pending``/``active`` session bound (``tech_session.gateway_id``) to a gateway
     whose lease is lost, or to a gateway without any lease row once this process has known of
     it for ``lease_unknown_grace_s`` (a crash left such sessions; after a restart, healthy
     gateways first get time to beat). The close is the one of the ``agent_disconnected`` path:
     :func:`..sessions.service.close_open_sessions` under the agent row lock, reason
     ``gateway_lost``, actor ``system``, one audit row per session; a session another replica
     (or path) closed first is found closed under the lock and left alone, so two reapers never
     write two rows. An agent whose current connection is on that gateway (boot) goes offline in
     the same transaction. Each closed session's agent is then told ``tunnel.close``
     best-effort (it may sit behind a frozen gateway or have reconnected elsewhere); technicians'
     WebSockets and running commands notice through their session watch, as for any close.
  At most ``lease_reap_batch`` leases and sessions per round; ``run_lease_reaper`` bounds each
  round, logs and survives a failed one, and ends when its task is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col

from ..audit.models import SYSTEM_ACTOR
from ..bus import Bus
from ..config import ApiSettings
from ..db import utcnow
from ..errors import is_database_unavailable
from ..sessions.models import OPEN_STATES, TechSession
from ..sessions.service import close_open_sessions, lock_agent, tell_agent_to_close
from .models import Agent, AgentConnection, GatewayLease

log = logging.getLogger(__name__)

GATEWAY_LOST = "gateway_lost"


def is_lost(lease: GatewayLease) -> bool:
    """The lease's current boot was declared lost (its heartbeats are ignored)."""
    return lease.lost_boot_id is not None and lease.lost_boot_id == lease.boot_id


def _live_sql() -> ColumnElement[bool]:
    return or_(
        col(GatewayLease.lost_boot_id).is_(None),
        col(GatewayLease.lost_boot_id) != col(GatewayLease.boot_id),
    )


def _open_sql() -> ColumnElement[bool]:
    return col(TechSession.state).in_([s.value for s in OPEN_STATES])


@dataclass(frozen=True, slots=True)
class _Dead:
    """Sessions on a gateway that must close: all of them, or those of one ended boot."""

    boot_id: str | None
    """The lost or ended boot (None: a gateway never seen)."""
    only_that_boot: bool
    """Only sessions bound to connections of ``boot_id`` (a newer boot of it lives)."""


class LeaseReaper:
    """One API replica's reaper; ``started_at`` is this process's start on its own clock."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        bus: Bus,
        settings: ApiSettings,
        started_at: datetime | None = None,
        on_lease_lost: Callable[[], None] | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._on_lease_lost = on_lease_lost
        self._bus = bus
        self._settings = settings
        self.started_at = started_at or utcnow()
        # gateways referenced by open sessions without a lease row: since when this reaper knows
        self._unknown_since: dict[str, datetime] = {}

    def expires_at(self, lease: GatewayLease) -> datetime:
        """When ``lease`` expires unless renewed (see the module contract)."""
        since = self.started_at
        return max(lease.renewed_at, since) + timedelta(seconds=lease.lease_ttl_s)

    async def reap(self, now: datetime | None = None) -> int:
        """One round (see the module contract); how many sessions it closed."""
        now = now or utcnow()
        async with self._sessionmaker() as db:
            bound = await self._gateways_with_open_sessions(db)
            leases = await self._leases(db, bound)
            expired = sorted(
                (
                    lease
                    for lease in leases.values()
                    if not is_lost(lease) and now > self.expires_at(lease)
                ),
                key=self.expires_at,
            )[: self._settings.lease_reap_batch]
            for lease in expired:
                if await self._mark_lost(db, lease, now) and self._on_lease_lost is not None:
                    self._on_lease_lost()
            if expired:
                leases = await self._leases(db, bound)
            return await self._close_sessions(db, self._dead(bound, leases, now))

    async def _gateways_with_open_sessions(self, db: AsyncSession) -> set[str]:
        async with db.begin():
            ids = await db.scalars(
                select(col(TechSession.gateway_id))
                .where(_open_sql(), col(TechSession.gateway_id).is_not(None))
                .distinct()
            )
            return {gateway_id for gateway_id in ids if gateway_id is not None}

    async def _leases(self, db: AsyncSession, gateway_ids: set[str]) -> dict[str, GatewayLease]:
        """Every live lease, and the lease rows (lost or not) of ``gateway_ids``."""
        where = _live_sql()
        if gateway_ids:
            where = or_(where, col(GatewayLease.gateway_id).in_(sorted(gateway_ids)))
        async with db.begin():
            rows = await db.scalars(
                select(GatewayLease).where(where).execution_options(populate_existing=True)
            )
            return {row.gateway_id: row for row in rows}

    async def _mark_lost(self, db: AsyncSession, lease: GatewayLease, now: datetime) -> bool:
        """Declare ``lease``'s boot lost unless it was renewed (or declared lost) meanwhile;
        True when that was a loss (not the end of a drained gateway, which counts as none)."""
        gateway_id, boot_id, renewed_at = lease.gateway_id, lease.boot_id, lease.renewed_at
        async with db.begin():
            marked = cast(
                CursorResult[Any],
                await db.execute(
                    update(GatewayLease)
                    .where(
                        col(GatewayLease.gateway_id) == gateway_id,
                        col(GatewayLease.boot_id) == boot_id,
                        col(GatewayLease.renewed_at) == renewed_at,
                        _live_sql(),
                    )
                    .values(lost_boot_id=boot_id, lost_at=now)
                    .execution_options(synchronize_session=False)
                ),
            )
            if marked.rowcount != 1:
                return False
            # as the disconnect path does: offline only if the current connection is there
            offline = cast(
                CursorResult[Any],
                await db.execute(
                    update(Agent)
                    .where(
                        col(Agent.online).is_(True),
                        col(Agent.gateway_id) == gateway_id,
                        exists().where(
                            col(AgentConnection.conn_id) == col(Agent.conn_id),
                            col(AgentConnection.boot_id) == boot_id,
                        ),
                    )
                    .values(online=False)
                    .execution_options(synchronize_session=False)
                ),
            )
        if lease.draining:
            # its last beat said it was draining: a gateway that stopped, not one that was lost
            log.info(
                "lease of drained gateway boot %s ended",
                boot_id,
                extra={"gateway_id": gateway_id, "count": offline.rowcount},
            )
            return False
        log.warning(
            "gateway lease lost: boot %s not renewed for %.1f s (ttl %.1f s)",
            boot_id,
            (now - renewed_at).total_seconds(),
            lease.lease_ttl_s,
            extra={"gateway_id": gateway_id, "count": offline.rowcount},
        )
        return True

    def _dead(
        self, bound: set[str], leases: dict[str, GatewayLease], now: datetime
    ) -> dict[str, _Dead]:
        """Gateways with sessions that must close, and which of them."""
        grace = timedelta(seconds=self._settings.lease_unknown_grace_s)
        dead: dict[str, _Dead] = {}
        for gateway_id in bound:
            lease = leases.get(gateway_id)
            if lease is None:
                since = self._unknown_since.setdefault(gateway_id, now)
                if now - since >= grace:
                    dead[gateway_id] = _Dead(boot_id=None, only_that_boot=False)
            elif is_lost(lease):
                dead[gateway_id] = _Dead(boot_id=lease.boot_id, only_that_boot=False)
            elif lease.lost_boot_id is not None:
                # an ended earlier boot (the gateway restarted under the same id): its sessions
                dead[gateway_id] = _Dead(boot_id=lease.lost_boot_id, only_that_boot=True)
        for gateway_id in list(self._unknown_since):
            if gateway_id not in bound or gateway_id in leases:
                del self._unknown_since[gateway_id]
        return dead

    async def _close_sessions(self, db: AsyncSession, dead: dict[str, _Dead]) -> int:
        if not dead:
            return 0
        whole = sorted(g for g, d in dead.items() if not d.only_that_boot)
        which: list[ColumnElement[bool]] = [col(TechSession.gateway_id).in_(whole)] if whole else []
        which += [
            and_(
                col(TechSession.gateway_id) == gateway_id,
                col(TechSession.conn_id).in_(
                    select(col(AgentConnection.conn_id)).where(
                        col(AgentConnection.boot_id) == d.boot_id
                    )
                ),
            )
            for gateway_id, d in sorted(dead.items())
            if d.only_that_boot
        ]
        async with db.begin():
            candidates = (
                await db.execute(
                    select(col(TechSession.agent_id), col(TechSession.gateway_id))
                    .where(_open_sql(), or_(*which))
                    .limit(self._settings.lease_reap_batch)
                )
            ).all()
        closed = 0
        for agent_id, gateway_id in candidates:
            assert gateway_id is not None  # selected by gateway_id
            boot_id, only_that_boot = dead[gateway_id].boot_id, dead[gateway_id].only_that_boot
            async with db.begin():
                agent = await lock_agent(db, agent_id)
                if agent is None:
                    continue
                rows = await close_open_sessions(
                    db,
                    agent_id=agent_id,
                    gateway_id=gateway_id,
                    boot_id=boot_id if only_that_boot else None,
                    reason=GATEWAY_LOST,
                    actor=SYSTEM_ACTOR,
                    detail={"gateway_id": gateway_id, "boot_id": boot_id},
                )
                if agent.online and agent.gateway_id == gateway_id:
                    conn = await db.get(AgentConnection, agent.conn_id) if agent.conn_id else None
                    if only_that_boot:
                        if conn is not None and conn.boot_id == boot_id:
                            agent.online = False
                    elif boot_id is None or conn is None or conn.boot_id == boot_id:
                        agent.online = False
                session_ids = [row.id for row in rows]
            for session_id in session_ids:
                log.info(
                    "session closed: its gateway lost its lease",
                    extra={
                        "agent_id": agent_id,
                        "session_id": session_id,
                        "gateway_id": gateway_id,
                    },
                )
                tell_agent_to_close(
                    self._bus, self._settings, agent_id, session_id, reason=GATEWAY_LOST
                )
            closed += len(session_ids)
        return closed


async def run_lease_reaper(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    bus: Bus,
    settings: ApiSettings,
    on_lease_lost: Callable[[], None] | None = None,
) -> None:
    """Reap every ``lease_reap_interval_s`` until cancelled; started after the bus subscribed.

    ``on_lease_lost`` is called once for each lease this replica marked lost (a metric)."""
    reaper = LeaseReaper(sessionmaker, bus=bus, settings=settings, on_lease_lost=on_lease_lost)
    # a round: a few bounded reads, then at most ``lease_reap_batch`` leases and sessions
    bound_s = settings.request_timeout_s * (4 + 3 * settings.lease_reap_batch)
    task = asyncio.current_task()
    database_was_down = False
    # the cancel count too, not only CancelledError: wait_for can swallow a cancel on 3.11
    while task is None or task.cancelling() == 0:
        await asyncio.sleep(settings.lease_reap_interval_s)
        if database_was_down:
            # see the module contract: every gateway gets a whole TTL from the database's return
            reaper.started_at = utcnow()
        try:
            closed = await asyncio.wait_for(reaper.reap(), bound_s)
        except Exception as exc:
            database_was_down = database_was_down or is_database_unavailable(exc)
            log.warning("lease reap failed", extra={"error": type(exc).__name__})
            continue
        database_was_down = False
        if closed:
            log.info("lease reaper closed sessions", extra={"count": closed})
