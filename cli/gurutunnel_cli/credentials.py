"""Where the CLI keeps its API URL and technician token, and which source wins.

Contract:
- ``gurutunnel login`` stores ``{"api_url", "token", "expires_at"}`` (ISO 8601, UTC) in
  ``$XDG_CONFIG_HOME/gurutunnel/credentials.json`` (``~/.config`` when unset). The directory is
  0700 and the file 0600, whatever the umask; the file is replaced atomically.
- ``GT_CLI_API_URL`` and ``GT_CLI_TOKEN`` override the file, each on its own (scripts and tests
  need no file at all). A token from the environment carries no expiry: the API judges it.
- No token, or a stored token past its ``expires_at``: ``AuthError`` (exit 3, "run gurutunnel
  login").
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .errors import AuthError, CliError

ENV_API_URL = "GT_CLI_API_URL"
ENV_TOKEN = "GT_CLI_TOKEN"  # noqa: S105 - the variable's name, not a secret
DEFAULT_API_URL = "http://127.0.0.1:8080"
FILE_NAME = "credentials.json"


@dataclass(frozen=True)
class Credentials:
    api_url: str
    token: str
    expires_at: datetime | None = None


def config_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/gurutunnel``, or ``~/.config/gurutunnel``."""
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gurutunnel"


def credentials_path(env: Mapping[str, str]) -> Path:
    return config_dir(env) / FILE_NAME


def save(creds: Credentials, env: Mapping[str, str]) -> Path:
    """Write the credentials file (dir 0700, file 0600, atomic replace); returns its path."""
    directory = config_dir(env)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkdir's mode is filtered by the umask and ignored for an existing directory
    directory.chmod(0o700)
    body = {
        "api_url": creds.api_url,
        "token": creds.token,
        "expires_at": creds.expires_at.isoformat() if creds.expires_at else None,
    }
    # mkstemp creates the file 0600 from the start, so the token is never readable by others
    fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
            f.write("\n")
        os.chmod(tmp, 0o600)
        target = directory / FILE_NAME
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_file(env: Mapping[str, str]) -> Credentials | None:
    """The stored credentials, or None when there is no file."""
    path = credentials_path(env)
    try:
        raw = json.loads(path.read_text())
        expires = raw.get("expires_at")
        return Credentials(
            api_url=str(raw["api_url"]),
            token=str(raw["token"]),
            expires_at=datetime.fromisoformat(expires) if expires else None,
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CliError(
            "bad_credentials", f"cannot read {path} ({exc}); run gurutunnel login"
        ) from exc


def resolve(env: Mapping[str, str], now: datetime | None = None) -> Credentials:
    """The credentials to use: environment first, then the file; raise ``AuthError`` if none."""
    env_url = env.get(ENV_API_URL) or None
    env_token = env.get(ENV_TOKEN) or None
    stored = None if (env_url and env_token) else load_file(env)
    api_url = env_url or (stored.api_url if stored else None) or DEFAULT_API_URL
    if env_token:
        return Credentials(api_url=api_url.rstrip("/"), token=env_token)
    if stored is None:
        raise AuthError(f"not logged in (no {ENV_TOKEN} and no {credentials_path(env)})")
    now = now or datetime.now(UTC)
    if stored.expires_at is not None and stored.expires_at <= now:
        raise AuthError(f"the stored token expired at {stored.expires_at.isoformat()}")
    return Credentials(
        api_url=api_url.rstrip("/"), token=stored.token, expires_at=stored.expires_at
    )


def default_api_url(env: Mapping[str, str]) -> str:
    """The API URL ``login`` uses without ``--api``: environment, stored file, then default."""
    if env.get(ENV_API_URL):
        return env[ENV_API_URL]
    try:
        stored = load_file(env)
    except CliError:
        stored = None
    return stored.api_url if stored else DEFAULT_API_URL
