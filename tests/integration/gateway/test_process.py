"""The real ``gurutunnel-gateway`` process: start, serve an agent, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from websockets.exceptions import ConnectionClosed

from gurutunnel_protocol import CloseCode, Subjects, new_id
from gurutunnel_protocol.messages import AgentDisconnected, DisconnectReason, Reconnect, Welcome
from tests.support.services import free_port

from .agent_client import agent_socket, recv_frame
from .conftest import wait_presence
from .credentials import mint_agent_credential

STARTUP_TIMEOUT_S = 15.0


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except (URLError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError("gateway not ready in time")


@contextlib.contextmanager
def running_gateway(
    nats_url: str,
    subject_prefix: str,
    public_key_pem: str,
    tmp_path: Path,
    **settings: str,
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """The installed gurutunnel-gateway entry point on a free port (``settings``: more
    ``GT_GATEWAY_*`` variables, by lower-case name); killed if still running."""
    port = free_port()
    key_file = tmp_path / "agent_pub.pem"
    key_file.write_text(public_key_pem)
    log_path = tmp_path / "gateway.log"
    env = {
        **os.environ,
        "GT_GATEWAY_PORT": str(port),
        "GT_GATEWAY_NATS_URL": nats_url,
        "GT_GATEWAY_SUBJECT_PREFIX": subject_prefix,
        "GT_GATEWAY_AGENT_PUBLIC_KEY_FILE": str(key_file),
        "GT_GATEWAY_HEARTBEAT_INTERVAL_S": "0.2",
        "GT_GATEWAY_RECONNECT_JITTER_MAX_S": "0.2",
        "GT_GATEWAY_DRAIN_TIMEOUT_S": "5",
        **{f"GT_GATEWAY_{name.upper()}": value for name, value in settings.items()},
    }
    executable = Path(sys.executable).parent / "gurutunnel-gateway"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([str(executable)], env=env, stdout=log_file, stderr=log_file)
        try:
            wait_ready(port, proc)
            yield proc, port, log_path
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def gateway_process(
    nats_url: str,
    subject_prefix: str,
    agent_key: tuple[Ed25519PrivateKey, str],
    tmp_path: Path,
    nc: NATS,
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """The installed gurutunnel-gateway entry point on a free port; killed if still running."""
    with running_gateway(nats_url, subject_prefix, agent_key[1], tmp_path) as running:
        yield running


def gc_collections(port: int) -> dict[str, float]:
    """``gurutunnel_gateway_gc_collections_total`` by kind, from the process's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gurutunnel_gateway_gc_collections_total{"):
            labels, _, value = line.rpartition(" ")
            counts[labels.split('kind="', 1)[1].split('"', 1)[0]] = float(value)
    return counts


async def test_real_process_serves_agent_and_drains_on_sigterm(
    gateway_process: tuple[subprocess.Popen[bytes], int, Path],
    agent_key: tuple[Ed25519PrivateKey, str],
    nc: NATS,
    subjects: Subjects,
) -> None:
    """The process welcomes an agent; SIGTERM sends reconnect, closes 4001 and exits 0."""
    proc, port, log_path = gateway_process
    agent_id = new_id()
    credential = mint_agent_credential(agent_key[0], agent_id)
    async with agent_socket(port, credential) as ws:
        welcome = await recv_frame(ws)
        assert isinstance(welcome, Welcome)
        await wait_presence(
            nc, subjects, agent_id, event_type="presence.connected", conn_id=welcome.conn_id
        )
        proc.send_signal(signal.SIGTERM)
        reconnect = await recv_frame(ws)
        assert isinstance(reconnect, Reconnect)
        assert 0 <= reconnect.delay_ms <= 200
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == CloseCode.DRAINING
    assert await asyncio.to_thread(proc.wait, 10) == 0
    event, _ = await wait_presence(
        nc, subjects, agent_id, event_type="presence.disconnected", conn_id=welcome.conn_id
    )
    assert isinstance(event, AgentDisconnected)
    assert event.reason == DisconnectReason.SHUTDOWN
    lines = log_path.read_text().splitlines()
    assert lines, "the gateway logged nothing"
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert credential not in log_path.read_text()


async def test_the_process_runs_full_collections_itself_at_quiet_moments(
    nats_url: str,
    subject_prefix: str,
    agent_key: tuple[Ed25519PrivateKey, str],
    tmp_path: Path,
) -> None:
    """With a short gc_full_interval_s, the real process runs its own full collections (every
    second one deep) once no agent arrived for gc_quiet_s, and counts them in /metrics."""
    with running_gateway(
        nats_url,
        subject_prefix,
        agent_key[1],
        tmp_path,
        gc_full_interval_s="0.2",
        gc_quiet_s="0.1",
        gc_deep_every="2",
    ) as (_, port, log_path):
        credential = mint_agent_credential(agent_key[0], new_id())
        async with agent_socket(port, credential) as ws:
            assert isinstance(await recv_frame(ws), Welcome)
            counts: dict[str, float] = {}
            async with asyncio.timeout(10):
                while counts.get("recent", 0) < 1 or counts.get("deep", 0) < 1:
                    await asyncio.sleep(0.1)
                    counts = await asyncio.to_thread(gc_collections, port)
        logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert any(entry.get("msg") == "full garbage collection" for entry in logged)
