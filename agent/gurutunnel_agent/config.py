"""Agent settings: environment (``GT_AGENT_*``) over an optional TOML file, validated once.

Contract:
- ``load_settings(config_file)`` builds :class:`AgentSettings` from, in decreasing priority,
  keyword overrides, the environment (prefix ``GT_AGENT_``), then the TOML file named by
  ``config_file`` or ``GT_AGENT_CONFIG_FILE`` (flat keys named like the fields). Nothing is read
  at import time.
- Bad configuration raises :class:`ConfigError` (a missing or unreadable file, bad TOML) or
  ``pydantic.ValidationError`` (bad values); ``main`` turns both into exit code 1.
- ``gateway_url`` is required; ``gateway_urls`` (``GT_AGENT_GATEWAY_URLS``, a JSON list in the
  environment, a TOML array in the file) adds failover URLs. :attr:`AgentSettings.connect_urls`
  is ``gateway_url`` followed by the others not already listed, in order; the agent tries them
  in turn (see ``client.py``). Every URL is ``ws://`` or ``wss://`` without user info.
- Exactly one of ``credential`` and ``credential_file`` is set. The file is re-read on every
  connection attempt (:meth:`AgentSettings.read_credential`) so a rotated credential is picked
  up without a restart.
- Durations end in ``_s``, sizes in ``_bytes``; every wait of the agent is one of these.
- Channel settings (commands and shells): ``chunk_bytes`` (``GT_AGENT_CHUNK_BYTES``, output read
  and sent in pieces of at most this size), ``max_output_bytes`` (``GT_AGENT_MAX_OUTPUT_BYTES``,
  the agent's own cap per command; a request may only lower it), ``max_channels``
  (``GT_AGENT_MAX_CHANNELS``, channels per session), ``kill_grace_s`` (``GT_AGENT_KILL_GRACE_S``,
  SIGTERM -> SIGKILL delay when a process tree is killed; also how long output of an exited
  command may keep draining) and ``cwd_allowlist`` (``GT_AGENT_CWD_ALLOWLIST``, a JSON list of
  directories in the environment, a TOML array in the file; default: the user's home directory
  only, since a world-writable directory such as the system temp dir lets any local user plant
  what a command runs; the first entry is the default working directory), ``cwd_timeout_s``
  (``GT_AGENT_CWD_TIMEOUT_S``, bound on checking and opening a working directory, done on a
  worker thread: a hung mount refuses the command instead of stalling the agent) and
  ``shell_input_buffer_bytes`` (``GT_AGENT_SHELL_INPUT_BUFFER_BYTES``, technician input queued
  per shell; beyond it input is refused with ``tunnel.error{agent_backpressure}``).
- A short command is answered in one frame when the request asks for it (``inline_result``):
  ``inline_result_window_s`` (``GT_AGENT_INLINE_RESULT_WINDOW_S``, 20 ms; 0 turns it off) is how
  long the agent waits after the spawn for the command to end before it answers
  ``terminal.started``, and ``inline_result_bytes`` (``GT_AGENT_INLINE_RESULT_BYTES``, 32 KiB)
  how much output the answer may carry; what ended in time travels in the answer
  (``terminal.started.output``/``.exit``), the rest streams as usual. Neither the command nor
  the connection waits: the answer is sent by the channel's own task.
- File transfer settings (``gurutunnel_agent.channels.files``): ``file_allowlist``
  (``GT_AGENT_FILE_ALLOWLIST``, JSON list / TOML array of absolute directories a transfer may
  touch, subdirectories included; default: the same as ``cwd_allowlist``, the home directory),
  ``max_file_bytes`` (``GT_AGENT_MAX_FILE_BYTES``, 2 GiB, larger transfers are refused
  ``file_too_large``), ``file_chunk_bytes`` (``GT_AGENT_FILE_CHUNK_BYTES``, 256 KiB, at most
  512 KiB and small enough that a base64 chunk plus envelope fits ``max_frame_bytes``),
  ``file_window_bytes`` (``GT_AGENT_FILE_WINDOW_BYTES``, 4 MiB, unacknowledged bytes in flight,
  >= ``file_chunk_bytes``), ``file_ack_timeout_s`` (``GT_AGENT_FILE_ACK_TIMEOUT_S``, 30 s: a peer
  silent that long fails the transfer ``agent_timeout``; also the bound on preparing a
  transfer, which hashes the file on a worker thread) and ``file_fsync_every_bytes``
  (``GT_AGENT_FILE_FSYNC_EVERY_BYTES``, 8 MiB between ``fdatasync`` calls of an upload).
- Secrets: prefer ``credential_file`` (mode 0600) over ``GT_AGENT_CREDENTIAL``: a process's
  environment is readable by its owner and root through ``/proc/<pid>/environ`` for the life of
  the process. Whatever the source, no ``GT_AGENT_*`` variable (:data:`ENV_PREFIX`, matched
  case-insensitively like the settings themselves) ever reaches a command or shell the agent
  starts (``gurutunnel_agent.channels.process.child_environment``).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

ENV_PREFIX = "GT_AGENT_"
"""Prefix of every environment variable the settings are read from (case-insensitive)."""
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG_FILE"

# A bearer credential is a compact JWT; anything with whitespace or control characters would
# corrupt the HTTP header it travels in (header injection), so refuse it at load time.
_CREDENTIAL_RE = re.compile(r"^[\x21-\x7e]{1,8192}$")


class ConfigError(Exception):
    """Configuration that cannot be loaded (file missing, unreadable, not TOML)."""


class CredentialError(Exception):
    """The credential file cannot be read or holds no usable credential."""


def _default_cwd_allowlist() -> list[Path]:
    # evaluated when settings are built, never at import time
    return [Path.home()]


def _check_gateway_url(value: str) -> str:
    try:
        parse_uri(value)
    except InvalidURI:
        raise ValueError("must be a ws:// or wss:// URL") from None
    if "@" in value.split("/", 3)[2]:
        # credentials travel in a header, never in a URL (they would reach access logs)
        raise ValueError("must not contain user info; use credential or credential_file")
    return value


def _check_credential(value: str, *, where: str) -> str:
    if not _CREDENTIAL_RE.fullmatch(value):
        # never echo the value: it is a secret
        raise CredentialError(f"{where}: must be 1-8192 printable characters without spaces")
    return value


class AgentSettings(BaseSettings):
    """Every setting of the agent (env ``GT_AGENT_<NAME>``, or ``name = ...`` in the TOML file)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
    )

    gateway_url: str = Field(description="e.g. ws://127.0.0.1:8081/agent/v1/connect")
    gateway_urls: list[str] = Field(default_factory=list, max_length=64)
    """Failover gateways, tried in turn after ``gateway_url`` (see ``connect_urls``)."""
    credential: SecretStr | None = None
    """The bearer credential itself; prefer ``credential_file`` (the environ is in /proc)."""
    credential_file: Path | None = None
    """A file (mode 0600) holding the credential, re-read at every connection attempt."""

    heartbeat_interval_s: float = Field(default=30.0, gt=0, le=3600)
    """Upper bound between heartbeats; the gateway's ``welcome`` may ask for a shorter one."""
    ping_interval_s: float = Field(default=20.0, gt=0)
    ping_timeout_s: float = Field(default=20.0, gt=0)
    open_timeout_s: float = Field(default=10.0, gt=0)
    """Bound on TCP connect + WebSocket handshake."""
    welcome_timeout_s: float = Field(default=10.0, gt=0)
    """Bound on the wait for the gateway's ``welcome`` after the upgrade."""
    close_timeout_s: float = Field(default=5.0, gt=0)
    """Bound on the closing handshake."""
    send_timeout_s: float = Field(default=10.0, gt=0)
    """Bound on one send; a gateway that does not read for that long is treated as gone."""
    metrics_timeout_s: float = Field(default=5.0, gt=0)
    """Bound on collecting host metrics (a hung disk must not stop heartbeats for ever)."""
    max_frame_bytes: int = Field(default=1 << 20, ge=1024)

    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    backoff_factor: float = Field(default=2.0, ge=1)
    backoff_jitter: bool = True
    """Full jitter: each delay is uniform in [0, capped exponential]; off only for tests."""
    backoff_reset_after_s: float = Field(default=30.0, ge=0)
    """A connection that stayed up this long resets the backoff to its initial value."""
    reconnect_jitter_s: float = Field(default=1.0, ge=0)
    """Random extra delay in [0, this] added to a gateway's ``reconnect{delay_ms}``."""

    chunk_bytes: int = Field(default=32 * 1024, ge=1, le=512 * 1024)
    """Largest piece of command or shell output sent in one ``terminal.chunk``."""
    max_output_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    """Cap on the output delivered per command (stdout + stderr); the rest is dropped, flagged."""
    inline_result_window_s: float = Field(default=0.02, ge=0, le=1)
    """How long ``terminal.started`` waits for the command to end, so that a short command's
    output and exit travel in the answer (one frame instead of three); 0: answer at once."""
    inline_result_bytes: int = Field(default=32 * 1024, ge=0, le=256 * 1024)
    """Output a ``terminal.started`` answer may carry (base64 in the frame: well under
    ``max_frame_bytes``)."""
    max_channels: int = Field(default=16, ge=1, le=1024)
    """Channels open at once in one session; one more is refused ``too_many_channels``."""
    kill_grace_s: float = Field(default=2.0, gt=0, le=60)
    """SIGTERM (SIGHUP for shells) to a process group, then SIGKILL after this long."""
    cwd_allowlist: list[Path] = Field(
        default_factory=lambda: _default_cwd_allowlist(), min_length=1
    )
    """Directories a command may run in (their real paths, subdirectories included)."""
    cwd_timeout_s: float = Field(default=5.0, gt=0)
    """Bound on checking and opening a working directory (a hung mount refuses the command)."""
    shell_input_buffer_bytes: int = Field(default=1 << 20, ge=1024)
    """Technician input queued per shell; more is refused ``agent_backpressure``."""

    file_allowlist: list[Path] = Field(
        default_factory=lambda: _default_cwd_allowlist(), min_length=1
    )
    """Directories a file transfer may read or write (real paths, subdirectories included)."""
    max_file_bytes: int = Field(default=2 * 1024**3, ge=0)
    """Largest file uploaded or downloaded; larger is refused ``file_too_large``."""
    file_chunk_bytes: int = Field(default=256 * 1024, ge=1, le=512 * 1024)
    """Largest piece of a file in one ``file.chunk`` (announced in ``file.ready``)."""
    file_window_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    """Unacknowledged bytes a transfer may have in flight (>= ``file_chunk_bytes``)."""
    file_ack_timeout_s: float = Field(default=30.0, gt=0)
    """A transfer whose peer is silent this long fails ``agent_timeout``; also bounds its
    preparation (resolving, opening and hashing the file on a worker thread)."""
    file_fsync_every_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    """An upload is flushed to disk (``fdatasync``) at least this often, and at the end."""

    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # env overrides the file; no .env or secrets directory: one documented place each
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @field_validator("gateway_url")
    @classmethod
    def _gateway_url_is_websocket(cls, value: str) -> str:
        return _check_gateway_url(value)

    @field_validator("gateway_urls")
    @classmethod
    def _gateway_urls_are_websocket(cls, value: list[str]) -> list[str]:
        for url in value:
            _check_gateway_url(url)
        return value

    @property
    def connect_urls(self) -> list[str]:
        """``gateway_url``, then each of ``gateway_urls`` not already listed, in order."""
        return list(dict.fromkeys([self.gateway_url, *self.gateway_urls]))

    @field_validator("credential")
    @classmethod
    def _credential_is_header_safe(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                _check_credential(value.get_secret_value(), where="credential")
            except CredentialError as exc:
                raise ValueError(str(exc).split(": ", 1)[1]) from None
        return value

    @field_validator("cwd_allowlist", "file_allowlist")
    @classmethod
    def _allowlist_is_absolute(cls, value: list[Path]) -> list[Path]:
        for entry in value:
            if not entry.is_absolute():
                raise ValueError(f"{entry}: must be an absolute path")
        return value

    @model_validator(mode="after")
    def _one_credential_source(self) -> AgentSettings:
        if (self.credential is None) == (self.credential_file is None):
            raise ValueError("set exactly one of credential and credential_file")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        # a chunk travels base64-encoded (4/3) inside a JSON frame: it must fit the frame limit
        if self.chunk_bytes * 4 // 3 + 1024 > self.max_frame_bytes:
            raise ValueError("chunk_bytes is too large for max_frame_bytes (base64 + envelope)")
        if self.file_chunk_bytes * 4 // 3 + 1024 > self.max_frame_bytes:
            raise ValueError(
                "file_chunk_bytes is too large for max_frame_bytes (base64 + envelope)"
            )
        if self.file_window_bytes < self.file_chunk_bytes:
            raise ValueError("file_window_bytes must be >= file_chunk_bytes")
        if self.credential_file is not None:
            try:
                self.read_credential()
            except CredentialError as exc:
                raise ValueError(str(exc)) from None
        return self

    def read_credential(self) -> str:
        """The bearer credential, re-read from ``credential_file`` at every call."""
        if self.credential is not None:
            return self.credential.get_secret_value()
        assert self.credential_file is not None  # guaranteed by the model validator
        try:
            text = self.credential_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
            raise CredentialError(f"credential_file {self.credential_file}: {reason}") from None
        return _check_credential(text.strip(), where=f"credential_file {self.credential_file}")


def load_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Settings from ``overrides`` > environment > TOML file (``config_file`` or env)."""
    if config_file is None and os.environ.get(CONFIG_FILE_ENV):
        config_file = Path(os.environ[CONFIG_FILE_ENV])
    if config_file is None:
        return AgentSettings(**overrides)
    try:
        with config_file.open("rb") as fh:
            tomllib.load(fh)  # parsed here first so a bad file gets a clear error
    except OSError as exc:
        raise ConfigError(f"config file {config_file}: {exc.strerror or 'unreadable'}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_file}: invalid TOML: {exc}") from None

    class FileAgentSettings(AgentSettings):
        model_config = SettingsConfigDict(toml_file=config_file)

    return FileAgentSettings(**overrides)
