"""Settings of the API service: one ``ApiSettings`` read from ``GT_API_*`` environment variables.

Durations end in ``_s`` (seconds). Nothing reads the environment at import time: ``create_app``
and the CLI build the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gurutunnel_protocol import DEFAULT_PREFIX
from gurutunnel_protocol.messages import MAX_WINDOW_BYTES, MIN_WINDOW_BYTES

DAY_S = 24 * 3600


class ApiSettings(BaseSettings):
    """Every tunable of the API (env prefix ``GT_API_``)."""

    model_config = SettingsConfigDict(env_prefix="GT_API_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)

    # database
    database_url: str = "sqlite+aiosqlite:///./.gurutunnel/api.db"
    request_timeout_s: float = Field(default=10.0, gt=0)
    """Bound of one database statement, connection attempt and pool checkout."""
    sqlite_busy_timeout_s: float = Field(default=10.0, gt=0)
    """How long a SQLite writer waits for the lock before ``database is locked``."""
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "NORMAL"
    """SQLite's ``PRAGMA synchronous`` (the database runs in WAL mode). ``NORMAL``, SQLite's
    advice for WAL: a commit survives a crash of the API process but not of the operating
    system (the last commits before a power cut may roll back); it spares an fsync per commit,
    most of a command's database time. ``FULL`` syncs every commit."""
    db_pool_size: int = Field(default=10, ge=1)

    shutdown_grace_s: int = Field(default=10, gt=0)
    """How long uvicorn waits for open requests, streams and WebSockets before it closes them
    at shutdown (``timeout_graceful_shutdown``); a live output stream would otherwise hold the
    process open until the technician hangs up."""

    # bus
    nats_url: str = "nats://127.0.0.1:4222"
    subject_prefix: str = DEFAULT_PREFIX
    nats_connect_timeout_s: float = Field(default=2.0, gt=0)
    nats_ping_interval_s: float = Field(default=5.0, gt=0)
    nats_max_outstanding_pings: int = Field(default=2, ge=1)
    nats_reconnect_wait_s: float = Field(default=0.5, gt=0)
    nats_max_reconnect_attempts: int = -1
    """-1 reconnects forever (readiness reports the outage meanwhile)."""
    nats_drain_timeout_s: float = Field(default=5.0, gt=0)
    jetstream_replicas: int = Field(default=1, ge=1, le=5)
    """Replicas of the presence stream and the revocation bucket when this service creates them
    (3 on a three-node JetStream cluster; 1 on a single server, which refuses more)."""
    presence_fetch_batch: int = Field(default=64, ge=1)
    presence_fetch_timeout_s: float = Field(default=1.0, gt=0)
    presence_ack_wait_s: float = Field(default=5.0, gt=0)
    """How long JetStream waits for the ack of a presence event before it redelivers it: the
    bound on replaying events an API fetched and then crashed on (a handler still running keeps
    its events in progress, so a slow one is never redelivered)."""
    presence_nak_delay_s: float = Field(default=1.0, ge=0)
    presence_check_interval_s: float = Field(default=5.0, gt=0)
    """While idle, how often the presence consumer is checked for existence."""
    presence_max_fetch_errors: int = Field(default=5, ge=1)
    """Consecutive fetch errors after which the presence consumer is recreated."""
    presence_resubscribe_backoff_s: float = Field(default=0.2, gt=0)
    presence_resubscribe_backoff_max_s: float = Field(default=5.0, gt=0)

    # tokens
    jwt_secret: SecretStr
    jwt_ttl_s: int = Field(default=900, gt=0)
    agent_signing_key_file: Path | None = None
    """Ed25519 private key (PKCS#8 PEM) signing agent credentials (``gurutunnel-api keygen``)."""
    agent_credential_ttl_s: int = Field(default=365 * DAY_S, gt=0)
    password_hash_concurrency: int = Field(default=2, ge=1)
    """argon2 hashes/verifications running at once (each in a worker thread, ~150 ms)."""

    # logs
    log_level: str = "INFO"

    # sessions
    open_timeout_s: float = Field(default=10.0, gt=0)
    close_timeout_s: float = Field(default=5.0, gt=0)
    pending_sweep_interval_s: float = Field(default=5.0, gt=0)
    """How often the sweeper fails ``pending`` sessions older than open + close timeouts."""
    pending_sweep_batch: int = Field(default=100, ge=1)
    """At most this many agents' stale sessions are failed per sweep."""

    # gateway leases (close path 2, see agents/leases.py)
    lease_reap_interval_s: float = Field(default=1.0, gt=0)
    """How often the lease reaper looks for gateways whose lease expired (judged on this API's
    clock: the time each heartbeat was handled, never the gateway's own ``at``)."""
    lease_unknown_grace_s: float = Field(default=10.0, ge=0)
    """A gateway with open sessions but no heartbeat on record is judged lost only after this
    process has known of it this long (an API restart must not close the sessions of healthy
    gateways whose first heartbeat has not arrived yet)."""
    lease_reap_batch: int = Field(default=100, ge=1)
    """At most this many leases marked lost and sessions closed per reaper round."""

    # work inside a session (commands, WebSocket) and session limits
    session_idle_timeout_s: float = Field(default=900.0, gt=0)
    """An active session without activity (exec, shell, input, resize, cancel) this long closes."""
    session_max_duration_s: float = Field(default=28800.0, gt=0)
    """An active session open this long closes, active or not."""
    session_reap_interval_s: float = Field(default=5.0, gt=0)
    """How often the reaper looks for sessions past the idle timeout or the maximum duration."""
    session_reap_batch: int = Field(default=100, ge=1)
    activity_write_interval_s: float = Field(default=5.0, ge=0)
    """A WebSocket records shell input/resize activity at most this often (one UPDATE each)."""
    session_watch_interval_s: float = Field(default=1.0, gt=0)
    """How often a running command or an open WebSocket checks that its session is still active."""
    exec_start_timeout_s: float = Field(default=10.0, gt=0)
    """How long the agent has to answer ``terminal.command`` / ``shell.open``."""
    exec_grace_s: float = Field(default=10.0, gt=0)
    """A command's exit frame may come this long after its ``timeout_s`` before the API gives up."""
    exec_close_grace_s: float = Field(default=3.0, gt=0)
    """After the session closed (or a client went away) the exit frame may take this long."""
    max_result_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    """Cap on the output (stdout + stderr) a full-result exec holds in memory; more is truncated."""
    output_window_bytes: int = Field(default=256 * 1024, ge=MIN_WINDOW_BYTES, le=MAX_WINDOW_BYTES)
    """Output flow control of every command and shell (``window_bytes``): the output an agent may
    have sent and the API not yet handed to the technician (an exec's result is taken as it
    arrives; a stream's and a WebSocket's output once written to the client). A slow reader
    slows the command down instead of losing output; a larger window streams faster over a
    link with a long round trip, at that much memory per channel."""
    session_sub_pending_msgs: int = Field(default=8192, ge=1)
    """Frames a session subscription may buffer; more are dropped by NATS (shown as a gap)."""
    session_sub_pending_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    ws_ticket_ttl_s: float = Field(default=30.0, gt=0)
    ws_send_queue_max: int = Field(default=4096, ge=1)
    """Messages queued for one technician WebSocket; a reader slower than that is closed (1013)."""
    ws_send_queue_max_bytes: int = Field(default=1024 * 1024, ge=64 * 1024)
    """Bytes queued for one technician WebSocket (the memory a stalled reader can hold here).
    Output is acknowledged only once written, so one channel queues at most about
    ``output_window_bytes`` (x 4/3, base64); several channels of a reader who stops reading can
    still overflow it, and the socket then closes with 1013. Each MiB here is a MiB of every
    stalled session's cost."""
    ws_send_timeout_s: float = Field(default=10.0, gt=0)
    """Bound of one WebSocket send (and of the close handshake of a socket being dropped)."""
    ws_per_message_deflate: bool = False
    """Offer permessage-deflate (RFC 7692) on the technician WebSocket. Off by default: output
    travels as base64 in JSON, so random or already compressed output shrinks by only ~23% for
    ~30 ms of API CPU per MB (zlib on the event loop, the API's bottleneck when streaming);
    terminal text shrinks ~5x (to ~0.3x the raw output) at about half that cost. Turn it on
    when technicians read mostly text over slow links and the API has CPU to spare."""
    ws_max_channels: int = Field(default=16, ge=1)
    """Channels (commands and shells) one WebSocket may run at once."""

    # file transfer inside a session
    file_start_timeout_s: float = Field(default=40.0, gt=0)
    """How long the agent has to answer ``file.upload`` / ``file.download`` (it hashes the file
    or the resumed part first; the agent bounds that by its own ack timeout)."""
    file_idle_timeout_s: float = Field(default=30.0, gt=0)
    """A transfer with no progress from the agent (ack, chunk, done) for this long fails
    ``agent_timeout``; also the bound of the wait for ``file.done`` after the last byte."""
    file_cancel_wait_s: float = Field(default=5.0, gt=0)
    """After ``file.cancel``, how long the API waits for the agent's final frame (the agent
    releases the partial file's lock then)."""

    @field_validator("jwt_secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 32:
            raise ValueError("jwt_secret must be at least 32 characters")
        return value
