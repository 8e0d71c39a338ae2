"""The real ``gurutunnel-agent`` process against the fake gateway: exit codes and messages."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from gurutunnel_protocol import CloseCode
from gurutunnel_protocol.messages import Heartbeat
from tests.integration.agent.fake_gateway import GOOD_CREDENTIAL, FakeGateway

AGENT_BIN = Path(sys.executable).parent / "gurutunnel-agent"


async def _spawn(env_overrides: dict[str, str]) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GT_AGENT_")}
    env.update(env_overrides)
    return await asyncio.create_subprocess_exec(
        str(AGENT_BIN),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def _fast_env(gateway: FakeGateway, credential: str) -> dict[str, str]:
    return {
        "GT_AGENT_GATEWAY_URL": gateway.url,
        "GT_AGENT_CREDENTIAL": credential,
        "GT_AGENT_BACKOFF_INITIAL_S": "0.05",
        "GT_AGENT_BACKOFF_MAX_S": "0.2",
        "GT_AGENT_CLOSE_TIMEOUT_S": "2",
    }


async def test_process_exits_2_with_a_clear_message_on_401(gateway: FakeGateway) -> None:
    """A refused credential ends the process with exit 2 and one clear line; no secret logged."""
    secret = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    proc = await _spawn(_fast_env(gateway, secret))
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
    text = stderr.decode()
    assert proc.returncode == 2, text
    assert (
        "gurutunnel-agent: credential refused by gateway (HTTP 401 unauthorized); not retrying"
        in text.splitlines()
    )
    assert secret not in text
    assert secret not in stdout.decode()
    assert len(gateway.auth_headers) == 1


async def test_process_exits_0_on_sigterm_after_a_clean_close(gateway: FakeGateway) -> None:
    """SIGTERM closes the socket with 1000 and the process exits 0."""
    proc = await _spawn(_fast_env(gateway, GOOD_CREDENTIAL))
    try:
        ws = await gateway.next_connection(timeout_s=20)
        await gateway.next_frame(Heartbeat, timeout_s=10)
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    ended, code, _ = await gateway.next_end()
    assert (ended, code) == (ws, CloseCode.NORMAL)
    assert GOOD_CREDENTIAL not in stderr.decode()


async def test_process_exits_1_on_bad_configuration(tmp_path: Path) -> None:
    """Missing settings exit 1 with a one-line summary naming the env variables."""
    proc = await _spawn({"GT_AGENT_CREDENTIAL": "x"})
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    text = stderr.decode()
    assert proc.returncode == 1, text
    assert text.startswith("gurutunnel-agent: invalid configuration: gateway_url (GT_AGENT_")
    assert len(text.strip().splitlines()) == 1
