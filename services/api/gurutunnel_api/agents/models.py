"""Tables ``agent``, ``agent_connection`` (fencing of presence events) and ``gateway_lease``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from ..db import UTCDateTime, utcnow


class Agent(SQLModel, table=True):
    """An enrolled machine; ``conn_id`` is its newest known connection (the fencing token)."""

    __tablename__ = "agent"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    online: bool = Field(default=False)
    conn_id: str | None = Field(default=None, max_length=64)
    gateway_id: str | None = Field(default=None, max_length=64)
    last_seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    metrics: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)


class AgentConnection(SQLModel, table=True):
    """One socket of an agent on a gateway, as the presence events described it."""

    __tablename__ = "agent_connection"

    conn_id: str = Field(primary_key=True, max_length=64)
    agent_id: str = Field(foreign_key="agent.id", ondelete="CASCADE", index=True, max_length=64)
    gateway_id: str = Field(max_length=64)
    boot_id: str = Field(max_length=64)
    connected_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    connected_seq: int | None = Field(default=None, sa_type=sa.BigInteger)
    """JetStream stream sequence of this connection's ``connected`` event: the order of
    connections (one clock, the stream's), None until that event is handled."""
    disconnected_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class GatewayLease(SQLModel, table=True):
    """The lease of each gateway: its last heartbeat, and the boot the lease reaper declared lost.

    The lease of ``boot_id`` is live until ``renewed_at + lease_ttl_s`` (``renewed_at`` is the
    API's clock when the heartbeat was handled); once expired, ``lost_boot_id = boot_id`` and
    heartbeats of that boot are ignored for good (see :mod:`.leases`)."""

    __tablename__ = "gateway_lease"

    gateway_id: str = Field(primary_key=True, max_length=64)
    boot_id: str = Field(max_length=64)
    last_seen_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    """The gateway's own ``at`` of its last heartbeat (informational: another machine's clock)."""
    renewed_at: datetime = Field(sa_type=UTCDateTime, nullable=False)
    """When an API handled the last heartbeat, on the API's clock: what expiry is judged on."""
    lease_ttl_s: float
    agents: int = Field(default=0)
    draining: bool = Field(default=False)
    lost_boot_id: str | None = Field(default=None, max_length=64)
    """The last boot whose lease expired; equal to ``boot_id`` while the lease is lost."""
    lost_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
