"""The technician WebSocket of the real ``gurutunnel-api serve`` offers permessage-deflate only
when ``GT_API_WS_PER_MESSAGE_DEFLATE`` turns it on (off by default: see
``ApiSettings.ws_per_message_deflate``)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from devstack.stack import API_PREFIX, Stack, StackConfig
from gurutunnel_protocol import new_id

from .conftest import E2E_API_ENV


@pytest.fixture(scope="module", params=["default", "on"])
def api(
    request: pytest.FixtureRequest, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Stack]]:
    """The API process alone (SQLite), with the setting left alone or turned on."""
    env = dict(E2E_API_ENV)
    if request.param == "on":
        env["GT_API_WS_PER_MESSAGE_DEFLATE"] = "true"
    root: Path = tmp_path_factory.mktemp(f"deflate-{request.param}")
    stack = Stack(
        StackConfig(
            root=root,
            nats_url=nats_url,
            subject_prefix=f"e{secrets.token_hex(4)}.gt",
            api_env=env,
        )
    )
    try:
        stack.start_api()
        yield request.param, stack
    finally:
        stack.close()


async def test_permessage_deflate_is_negotiated_only_when_the_setting_turns_it_on(
    api: tuple[str, Stack],
) -> None:
    # the socket is accepted before its ticket is checked: the handshake shows the extensions
    mode, stack = api
    url = f"{stack.api_url.replace('http://', 'ws://')}{API_PREFIX}/tunnel/{new_id()}/ws"
    async with connect(f"{url}?ticket=nope", open_timeout=10) as ws:
        assert ws.response is not None
        offered = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    assert ("permessage-deflate" in offered) == (mode == "on"), offered
