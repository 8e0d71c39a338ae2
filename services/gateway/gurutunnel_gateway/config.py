"""Gateway settings: one ``GatewaySettings`` read from ``GT_GATEWAY_*`` environment variables.

Contract: every limit and timeout is a named setting with a safe default; durations end in
``_s``, sizes in ``_bytes``. The agent credential public key is given either as a PEM file
(``GT_GATEWAY_AGENT_PUBLIC_KEY_FILE``) or as PEM text (``GT_GATEWAY_AGENT_PUBLIC_KEY``); one of
them is required. Settings are built in ``main()`` (or by a test), never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gurutunnel_protocol import DEFAULT_PREFIX, Subjects, new_id, validate_id


class GatewaySettings(BaseSettings):
    """Configuration of one gateway replica."""

    model_config = SettingsConfigDict(env_prefix="GT_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    nats_url: str = "nats://127.0.0.1:4222"
    subject_prefix: str = DEFAULT_PREFIX
    agent_public_key_file: Path | None = None
    agent_public_key: SecretStr | None = None
    gateway_id: str = Field(default_factory=new_id)
    log_level: str = "INFO"
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """``auto``: uvloop where it is installed (a dependency except on Windows), else asyncio's
    own loop; ``uvloop`` refuses to start without it; ``asyncio`` never uses it."""

    # agent socket limits
    max_frame_bytes: int = Field(default=1 << 20, gt=0)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """When set, ``/metrics`` (with ``/healthz`` and ``/readyz``) is served on this port only and
    the agent port answers it 404: the agent port sits behind a public load balancer, the
    operations port stays on the pod network for Prometheus and the probes."""
    listen_backlog: int = Field(default=4096, ge=1)
    """Pending TCP connections the kernel queues for the listener (asyncio's default, 100, turns
    a reconnect storm after a gateway loss into SYN retries that cost agents whole seconds;
    the kernel caps it at net.core.somaxconn)."""
    compression: Literal["deflate", "none"] = "none"
    """permessage-deflate (RFC 7692) on agent sockets when the agent offers it (``deflate``),
    or never (``none``, the default). Off by default: a tunnel compresses technician input and
    secrets in one context (a compression-oracle risk, as CRIME/BREACH over TLS); command output
    and file chunks travel as base64 of often incompressible bytes; it cost about a quarter of
    the gateway's CPU per command (and the agent's) and a zlib state per idle socket. Turn it on
    for agents on slow metered links whose output is mostly text."""
    open_timeout_s: float = Field(default=10.0, gt=0)
    max_concurrent_handshakes: int = Field(default=16, gt=0)
    """Upgrades from their credential check to their acknowledged ``presence.connected`` (101,
    command subscription, welcome, presence publish) in progress at once; more wait in arrival
    order (within ``open_timeout_s``), before their credential check. A reconnect storm then
    costs the sockets already served a few set-ups' worth of loop time per turn instead of
    thousands. A slot waits for NATS (the presence acknowledgement), so the slots bound the
    set-up rate when NATS is slow: 8 gave commands to agents already back a lower p99 on a
    quiet machine (31 ms against 42, bench scenario 6) but, on a loaded one, a set-up rate
    low enough that 3,757 of 10,000 agents passed their open timeout and backed off; 64 took
    30 % longer and gave 91 ms."""
    ping_interval_s: float = Field(default=10.0, gt=0)
    ping_timeout_s: float = Field(default=10.0, gt=0)
    close_timeout_s: float = Field(default=5.0, gt=0)
    send_queue_frames: int = Field(default=256, gt=0)
    max_consecutive_errors: int = Field(default=20, gt=0)
    agent_heartbeat_interval_s: float = Field(default=30.0, gt=0)
    # per-connection rate limit on agent frames (token bucket; RELIABILITY.md 12)
    max_frames_per_s: float = Field(default=200.0, gt=0)
    """Control frames (heartbeats, answers, errors) an agent may send per second; over it they
    are dropped with ``error{rate_limited}``. Session data frames are shaped by bytes instead."""
    frame_burst: int = Field(default=400, gt=0)
    max_read_bytes_per_s: float = Field(default=32 * 1024 * 1024, gt=0)
    """Bytes an agent may send per second, all frames counted; over it the gateway reads more
    slowly (TCP back-pressure to the agent) instead of dropping anything."""
    read_burst_bytes: int = Field(default=64 * 1024 * 1024, gt=0)

    # requests forwarded from agent.<id>.cmd
    command_timeout_s: float = Field(default=30.0, gt=0)
    max_pending_requests: int = Field(default=256, gt=0)
    sweep_interval_s: float = Field(default=1.0, gt=0)

    # garbage collection (``collector.py``)
    gc_full_interval_s: float = Field(default=300.0, ge=0)
    """A full collection of cyclic garbage every this often, at a quiet moment, instead of
    CPython's own (which stop the loop for most of a second, one after another, while a replica
    fills up with agents); 0 leaves CPython's collector as it is."""
    gc_quiet_s: float = Field(default=5.0, ge=0)
    """Quiet moment: no agent socket set up for this long (waited for at most one interval)."""
    gc_deep_every: int = Field(default=12, ge=1)
    """Every this many full collections, one also walks the objects frozen by the earlier ones
    (a socket that became cyclic garbage after it was frozen is freed then); sooner when more
    sockets ended than a quarter of those connected."""

    # lease and presence
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    lease_ttl_s: float = Field(default=6.0, gt=0)
    """The lease lasts this long after the send of the last heartbeat NATS confirmed; past it
    the gateway drops its agent sockets and takes a new boot id (the API closed its sessions)."""
    heartbeat_timeout_s: float = Field(default=2.0, gt=0)
    """Bound of one lease heartbeat (publish + flush); a slower one counts as not sent."""
    publish_timeout_s: float = Field(default=5.0, gt=0)
    jetstream_replicas: int = Field(default=1, ge=1, le=5)
    """Replicas of the presence stream and the revocation bucket when this service creates them
    (3 on a three-node JetStream cluster; 1 on a single server, which refuses more)."""
    presence_attempts: int = Field(default=5, gt=0)
    presence_retry_wait_s: float = Field(default=0.5, ge=0)
    revocation_snapshot_timeout_s: float = Field(default=10.0, gt=0)

    # shutdown
    drain_timeout_s: float = Field(default=10.0, gt=0)
    reconnect_jitter_max_s: float = Field(default=5.0, ge=0)

    # NATS client liveness (RELIABILITY.md 7: not left at defaults that hide a dead link)
    nats_ping_interval_s: float = Field(default=5.0, gt=0)
    nats_max_outstanding_pings: int = Field(default=2, gt=0)
    nats_connect_timeout_s: float = Field(default=2.0, gt=0)
    nats_reconnect_wait_s: float = Field(default=1.0, ge=0)
    nats_max_reconnect_attempts: int = Field(default=-1, ge=-1, description="-1: forever")

    @field_validator("gateway_id")
    @classmethod
    def _gateway_id_is_subject_safe(cls, value: str) -> str:
        return validate_id(value, what="gateway_id")

    @field_validator("subject_prefix")
    @classmethod
    def _prefix_is_subject_safe(cls, value: str) -> str:
        Subjects(value)
        return value

    @model_validator(mode="after")
    def _lease_outlives_beats(self) -> GatewaySettings:
        if self.lease_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                "lease_ttl_s must exceed heartbeat_interval_s (else the lease runs out between "
                "two heartbeats and the gateway keeps dropping its agents)"
            )
        return self

    @model_validator(mode="after")
    def _public_key_given(self) -> GatewaySettings:
        if self.agent_public_key is None and self.agent_public_key_file is None:
            raise ValueError(
                "set GT_GATEWAY_AGENT_PUBLIC_KEY_FILE or GT_GATEWAY_AGENT_PUBLIC_KEY "
                "(Ed25519 public key PEM that verifies agent credentials)"
            )
        return self

    def public_key_pem(self) -> str:
        """The PEM text of the agent credential public key (inline text wins over the file)."""
        if self.agent_public_key is not None:
            return self.agent_public_key.get_secret_value()
        assert self.agent_public_key_file is not None  # guaranteed by _public_key_given
        return self.agent_public_key_file.read_text(encoding="ascii")
