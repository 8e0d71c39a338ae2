"""The CLI's credentials file: where it lives, its modes, expiry, and the environment overrides."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gurutunnel_cli import credentials
from gurutunnel_cli.credentials import Credentials
from gurutunnel_cli.errors import EXIT_AUTH, AuthError, CliError

FUTURE = datetime.now(UTC) + timedelta(hours=1)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("loose_umask")
def test_saved_file_is_0600_in_a_0700_directory_even_with_umask_0(tmp_path: Path) -> None:
    """With umask 0 the directory is still 0700 and the file 0600."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    path = credentials.save(Credentials("http://api:8080", "tok", FUTURE), env)
    assert path == tmp_path / "cfg" / "gurutunnel" / "credentials.json"
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    body = json.loads(path.read_text())
    assert body["api_url"] == "http://api:8080" and body["token"] == "tok"
    assert datetime.fromisoformat(body["expires_at"]) == FUTURE
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]


def test_existing_open_directory_is_tightened_to_0700(tmp_path: Path) -> None:
    """A pre-existing 0755 config directory is made 0700 when the token is written."""
    directory = tmp_path / "gurutunnel"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    credentials.save(Credentials("http://a", "t", None), {"XDG_CONFIG_HOME": str(tmp_path)})
    assert _mode(directory) == 0o700


def test_default_location_is_dot_config_under_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without XDG_CONFIG_HOME the file goes to ~/.config/gurutunnel/credentials.json."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert credentials.credentials_path({}) == tmp_path / ".config/gurutunnel/credentials.json"


def test_file_credentials_are_used_when_the_environment_is_empty(tmp_path: Path) -> None:
    """The stored URL and token are used as stored."""
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    credentials.save(Credentials("http://stored:1/", "stored-token", FUTURE), env)
    got = credentials.resolve(env)
    assert (got.api_url, got.token) == ("http://stored:1", "stored-token")


def test_environment_overrides_the_file_each_value_on_its_own(tmp_path: Path) -> None:
    """GT_CLI_TOKEN replaces the stored token; GT_CLI_API_URL replaces the stored URL."""
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    credentials.save(Credentials("http://stored:1", "stored-token", FUTURE), env)
    only_token = credentials.resolve({**env, "GT_CLI_TOKEN": "env-token"})
    assert (only_token.api_url, only_token.token) == ("http://stored:1", "env-token")
    only_url = credentials.resolve({**env, "GT_CLI_API_URL": "http://env:2"})
    assert (only_url.api_url, only_url.token) == ("http://env:2", "stored-token")
    both = credentials.resolve({**env, "GT_CLI_API_URL": "http://env:2", "GT_CLI_TOKEN": "e"})
    assert (both.api_url, both.token) == ("http://env:2", "e")


def test_environment_alone_needs_no_file(tmp_path: Path) -> None:
    """GT_CLI_API_URL and GT_CLI_TOKEN work with no credentials file at all."""
    env = {"XDG_CONFIG_HOME": str(tmp_path), "GT_CLI_API_URL": "http://e", "GT_CLI_TOKEN": "t"}
    assert credentials.resolve(env) == Credentials("http://e", "t", None)


def test_expired_stored_token_asks_for_login_with_exit_3(tmp_path: Path) -> None:
    """A stored token past expires_at raises AuthError (exit 3) that says to run login."""
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    credentials.save(Credentials("http://a", "t", datetime.now(UTC) - timedelta(seconds=1)), env)
    with pytest.raises(AuthError) as info:
        credentials.resolve(env)
    assert info.value.exit_code == EXIT_AUTH
    assert "expired" in info.value.message and "run gurutunnel login" in info.value.message


def test_no_token_anywhere_asks_for_login(tmp_path: Path) -> None:
    """Neither environment nor file: AuthError naming the file and the login command."""
    with pytest.raises(AuthError) as info:
        credentials.resolve({"XDG_CONFIG_HOME": str(tmp_path), "GT_CLI_API_URL": "http://x"})
    assert "run gurutunnel login" in info.value.render()
    assert str(tmp_path) in info.value.message


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    """A credentials file that is not the expected JSON gives bad_credentials, not a traceback."""
    path = credentials.credentials_path({"XDG_CONFIG_HOME": str(tmp_path)})
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(CliError) as info:
        credentials.resolve({"XDG_CONFIG_HOME": str(tmp_path)})
    assert info.value.code == "bad_credentials"
