"""The decoder turns any unparseable input, however pathological, into a ProtocolError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gurutunnel_protocol import ErrorCode, ProtocolError
from gurutunnel_protocol.envelope import (
    decode_agent_command,
    decode_agent_to_server,
    decode_server_to_agent,
)

DEEP = 50_000  # far past the interpreter's recursion limit, far under the 1 MiB frame limit


@pytest.mark.parametrize(
    "decode", [decode_agent_to_server, decode_agent_command, decode_server_to_agent]
)
@pytest.mark.parametrize("raw", ["[" * DEEP, '{"a":' * DEEP, b"[" * DEEP], ids=["arr", "obj", "b"])
def test_deeply_nested_json_is_a_malformed_frame(
    decode: Callable[[str | bytes], Any], raw: str | bytes
) -> None:
    """JSON nested 50 000 deep raises ProtocolError(malformed_frame), not RecursionError."""
    with pytest.raises(ProtocolError) as info:
        decode(raw)
    assert info.value.code == ErrorCode.MALFORMED_FRAME
    assert len(info.value.message) < 100
