"""One-shot setup of the compose deployment: the admin user and the demo agent's credential.

Runs in the API image (``python /opt/bootstrap/bootstrap.py``) once the API answers /readyz:

1. ``gurutunnel-api create-admin --username admin`` with ``GT_ADMIN_PASSWORD`` (idempotent: an
   existing admin gets the password again);
2. unless ``BOOTSTRAP_CREDENTIAL_FILE`` already holds a credential: log in, enrol an agent named
   ``BOOTSTRAP_AGENT_NAME`` (``POST /api/v1/agents``) and write the credential it returns (shown
   once) to that file, mode 0600, through a temporary file and an atomic rename.

Exit 0 when done, 1 with a one-line reason otherwise. Never prints a password or credential.
Standard library only: the API image holds no HTTP client of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

API_PREFIX = "/api/v1"
ADMIN = "admin"
TIMEOUT_S = 30


def _post(url: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(  # noqa: S310 (the URL is the compose-internal API)
        url, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
        answer: dict[str, Any] = json.load(response)
        return answer


def main() -> int:
    api = os.environ.get("BOOTSTRAP_API_URL", "http://api:8080").rstrip("/")
    name = os.environ.get("BOOTSTRAP_AGENT_NAME", "demo-agent")
    credential_file = Path(
        os.environ.get("BOOTSTRAP_CREDENTIAL_FILE", "/var/lib/gurutunnel/agent/credential")
    )
    password = os.environ.get("GT_ADMIN_PASSWORD", "")
    if not password:
        print("bootstrap: GT_ADMIN_PASSWORD is not set", file=sys.stderr)
        return 1

    done = subprocess.run(
        ["gurutunnel-api", "create-admin", "--username", ADMIN],
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        print("bootstrap: create-admin failed", file=sys.stderr)
        return 1

    if credential_file.exists() and credential_file.read_text().strip():
        print(f"bootstrap: {credential_file} exists; the demo agent is already enrolled")
        return 0
    try:
        token = _post(f"{api}{API_PREFIX}/auth/token", {"username": ADMIN, "password": password})
        enrolled = _post(
            f"{api}{API_PREFIX}/agents", {"name": name}, token=str(token["access_token"])
        )
    except (urllib.error.URLError, TimeoutError, KeyError, ValueError) as exc:
        print(f"bootstrap: enrolment failed: {type(exc).__name__}", file=sys.stderr)
        return 1
    partial = credential_file.with_name(credential_file.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(str(enrolled["credential"]))
    partial.replace(credential_file)
    print(f"bootstrap: agent {enrolled['agent']['id']} ({name}) enrolled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
