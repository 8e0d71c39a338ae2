"""Unit tests of the agent's settings: sources, priorities and validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gurutunnel_agent.config import AgentSettings, ConfigError, CredentialError, load_settings
from gurutunnel_agent.main import summarize_validation_error

URL = "ws://127.0.0.1:8081/agent/v1/connect"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # the runner's own GT_AGENT_* variables must not leak into these tests
    for name in list(os.environ):
        if name.startswith("GT_AGENT_"):
            monkeypatch.delenv(name)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_documented_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the URL and credential are required; timings default as documented."""
    monkeypatch.setenv("GT_AGENT_GATEWAY_URL", URL)
    monkeypatch.setenv("GT_AGENT_CREDENTIAL", "tok")
    s = load_settings()
    assert s.gateway_url == URL
    assert s.read_credential() == "tok"
    assert (s.heartbeat_interval_s, s.ping_interval_s, s.ping_timeout_s) == (30, 20, 20)
    assert (s.open_timeout_s, s.max_frame_bytes) == (10, 1 << 20)
    assert (s.backoff_initial_s, s.backoff_max_s, s.backoff_factor) == (1, 60, 2)
    assert "tok" not in repr(s)


def test_environment_overrides_the_toml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values come from the TOML file unless the environment sets them."""
    path = _toml(tmp_path, f'gateway_url = "{URL}"\ncredential = "file-tok"\nping_interval_s = 7\n')
    monkeypatch.setenv("GT_AGENT_PING_INTERVAL_S", "3")
    s = load_settings(path)
    assert s.ping_interval_s == 3
    assert s.read_credential() == "file-tok"
    assert s.gateway_url == URL


def test_config_file_env_variable_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GT_AGENT_CONFIG_FILE names the TOML file when --config is not given."""
    path = _toml(tmp_path, f'gateway_url = "{URL}"\ncredential = "t"\nbackoff_max_s = 9\n')
    monkeypatch.setenv("GT_AGENT_CONFIG_FILE", str(path))
    assert load_settings().backoff_max_s == 9


def test_missing_or_invalid_config_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file and a file that is not TOML raise ConfigError naming the file."""
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(_toml(tmp_path, "gateway_url = \n"))


def test_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    """A typo in the TOML file is an error, not silently ignored."""
    path = _toml(tmp_path, f'gateway_url = "{URL}"\ncredential = "t"\nheartbeat_intervl_s = 1\n')
    with pytest.raises(ValidationError, match="heartbeat_intervl_s"):
        load_settings(path)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"gateway_url": URL}, "exactly one of credential and credential_file"),
        (
            {"gateway_url": URL, "credential": "a", "credential_file": "/x"},
            "exactly one of credential and credential_file",
        ),
        ({"gateway_url": "http://host/x", "credential": "a"}, "ws:// or wss://"),
        ({"gateway_url": "ws://user:pw@host/x", "credential": "a"}, "user info"),
        ({"gateway_url": URL, "credential": "a b"}, "without spaces"),
        ({"gateway_url": URL, "credential": "a", "ping_timeout_s": 0}, "greater than 0"),
        (
            {"gateway_url": URL, "credential": "a", "backoff_initial_s": 5, "backoff_max_s": 1},
            "backoff_max_s",
        ),
    ],
    ids=["no-credential", "two-credentials", "http-url", "userinfo", "space", "zero", "backoff"],
)
def test_bad_values_are_refused_with_a_clear_message(values: dict[str, Any], fragment: str) -> None:
    """Each bad setting fails validation with a message that names the problem."""
    with pytest.raises(ValidationError) as info:
        AgentSettings(**values)
    assert fragment in summarize_validation_error(info.value)


def test_validation_summary_never_shows_the_value() -> None:
    """The one-line summary names fields and env vars but never echoes an input value."""
    with pytest.raises(ValidationError) as info:
        AgentSettings(gateway_url="ws://h/x", credential="sec ret")
    summary = summarize_validation_error(info.value)
    assert "GT_AGENT_CREDENTIAL" in summary
    assert "sec ret" not in summary


def test_credential_file_is_read_again_on_every_call(tmp_path: Path) -> None:
    """A rotated credential file is picked up without rebuilding the settings."""
    path = tmp_path / "credential"
    path.write_text("first\n")
    s = AgentSettings(gateway_url=URL, credential_file=path)
    assert s.read_credential() == "first"
    path.write_text("second")
    assert s.read_credential() == "second"
    path.unlink()
    with pytest.raises(CredentialError, match="credential_file"):
        s.read_credential()


def test_unreadable_credential_file_fails_at_load(tmp_path: Path) -> None:
    """A credential file that does not exist at start is a configuration error."""
    with pytest.raises(ValidationError, match="credential_file"):
        AgentSettings(gateway_url=URL, credential_file=tmp_path / "missing")


def test_file_transfer_settings_default_as_documented() -> None:
    """file_* settings default to the home allowlist, 2 GiB, 256 KiB, 4 MiB, 30 s, 8 MiB."""
    s = AgentSettings(gateway_url=URL, credential="a")
    assert s.file_allowlist == s.cwd_allowlist == [Path.home()]
    assert (s.max_file_bytes, s.file_chunk_bytes, s.file_window_bytes) == (
        2 * 1024**3,
        256 * 1024,
        4 * 1024 * 1024,
    )
    assert (s.file_ack_timeout_s, s.file_fsync_every_bytes) == (30, 8 * 1024 * 1024)


def test_file_allowlist_and_limits_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GT_AGENT_FILE_ALLOWLIST (JSON list) and GT_AGENT_MAX_FILE_BYTES etc. are read."""
    monkeypatch.setenv("GT_AGENT_GATEWAY_URL", URL)
    monkeypatch.setenv("GT_AGENT_CREDENTIAL", "tok")
    monkeypatch.setenv("GT_AGENT_FILE_ALLOWLIST", f'["{tmp_path}"]')
    monkeypatch.setenv("GT_AGENT_MAX_FILE_BYTES", "1000")
    monkeypatch.setenv("GT_AGENT_FILE_WINDOW_BYTES", "524288")
    monkeypatch.setenv("GT_AGENT_FILE_ACK_TIMEOUT_S", "1.5")
    s = load_settings()
    assert s.file_allowlist == [tmp_path]
    assert (s.max_file_bytes, s.file_window_bytes, s.file_ack_timeout_s) == (1000, 524288, 1.5)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"file_allowlist": []}, "at least 1"),
        ({"file_allowlist": ["relative/dir"]}, "absolute path"),
        ({"file_chunk_bytes": 512 * 1024 + 1}, "less than or equal to 524288"),
        ({"file_chunk_bytes": 0}, "greater than or equal to 1"),
        ({"file_chunk_bytes": 64 * 1024, "max_frame_bytes": 64 * 1024}, "file_chunk_bytes"),
        ({"file_window_bytes": 1024, "file_chunk_bytes": 2048}, "file_window_bytes"),
        ({"file_ack_timeout_s": 0}, "greater than 0"),
        ({"max_file_bytes": -1}, "greater than or equal to 0"),
        ({"file_fsync_every_bytes": 0}, "greater than or equal to 1"),
    ],
    ids=[
        "empty-allowlist",
        "relative-allowlist",
        "chunk-above-512k",
        "chunk-zero",
        "chunk-too-large-for-frame",
        "window-below-chunk",
        "ack-timeout-zero",
        "negative-max-file",
        "fsync-zero",
    ],
)
def test_bad_file_settings_are_refused_with_a_clear_message(
    values: dict[str, Any], fragment: str
) -> None:
    """Each bad file_* setting fails validation with a message naming the problem."""
    with pytest.raises(ValidationError) as info:
        AgentSettings(gateway_url=URL, credential="a", **values)
    assert fragment in summarize_validation_error(info.value)
