"""A frame spliced into its envelope decodes to exactly the frame that was validated."""

from __future__ import annotations

import pytest

from gurutunnel_protocol.envelope import (
    decode_agent_to_server,
    decode_command_result,
    decode_session_up,
    encode,
    encode_spliced,
    spliced_head,
)
from gurutunnel_protocol.messages import (
    CommandReply,
    SessionUp,
    TerminalChunk,
    TerminalExit,
    TunnelReady,
)

STAMP = {"agent_id": "a1", "gateway_id": "g1", "boot_id": "b1", "conn_id": "c1"}

FRAMES = [
    # plain, as the agent encodes it
    encode(
        TerminalChunk(session_id="s1", channel_id="ch", seq=3, stream="stdout", data=b"\x00hi")
    ).decode(),
    # duplicate keys: the same (last) value wins for the gateway and for the receiver
    '{"type":"terminal.chunk","session_id":"s1","channel_id":"ch","seq":1,"seq":2,'
    '"stream":"stdout","data":"aGk=","data":"aG8="}',
    # unknown fields (a newer agent) travel on and are ignored by both
    '{"type":"terminal.exit","v":1,"session_id":"s1","channel_id":"ch","seq":0,'
    '"reason":"exited","exit_code":0,"duration_s":0.1,"stdout_bytes":2,"stderr_bytes":0,'
    '"later":{"nested":["x",1]}}',
    # whitespace and non-ASCII text
    ' { "type" : "tunnel.data", "session_id" : "s1", "channel_id" : "ch", "data" : "w6k=",'
    ' "note": "\u00e9\\u00e9" } ',
]


@pytest.mark.parametrize("raw", FRAMES)
def test_spliced_session_up_decodes_to_the_validated_frame(raw: str) -> None:
    """SessionUp around the agent's JSON equals SessionUp around the decoded frame."""
    validated = decode_agent_to_server(raw)
    spliced = encode_spliced(SessionUp, {**STAMP, "session_id": "s1", "seq": 7}, raw)
    up = decode_session_up(spliced)
    assert up.frame == validated
    assert up == SessionUp(**STAMP, session_id="s1", seq=7, frame=validated)


def test_duplicate_keys_resolve_to_the_last_value_on_both_sides() -> None:
    """The receiver sees the same duplicate-key resolution as the gateway's validation."""
    validated = decode_agent_to_server(FRAMES[1])
    assert isinstance(validated, TerminalChunk)
    assert (validated.seq, validated.data) == (2, b"ho")
    up = decode_session_up(
        encode_spliced(SessionUp, {**STAMP, "session_id": "s1", "seq": 0}, FRAMES[1])
    )
    assert isinstance(up.frame, TerminalChunk)
    assert (up.frame.seq, up.frame.data) == (2, b"ho")


def test_spliced_command_reply_decodes_to_the_validated_answer() -> None:
    """CommandReply around tunnel.ready's JSON (bytes too) equals the encoded reply."""
    raw = b'{"type":"tunnel.ready","req_id":"r1","session_id":"s1","x":null}'
    validated = decode_agent_to_server(raw)
    assert isinstance(validated, TunnelReady)
    reply = decode_command_result(encode_spliced(CommandReply, STAMP, raw))
    assert reply == CommandReply(**STAMP, frame=validated)


@pytest.mark.parametrize("field", ["frame", "type", "v"])
def test_splice_refuses_fields_it_sets_itself(field: str) -> None:
    """type, v and frame come from the envelope and the frame, never from the caller."""
    with pytest.raises(ValueError, match="must not hold"):
        encode_spliced(SessionUp, {**STAMP, field: "x"}, FRAMES[0])


def test_spliced_exit_frame_keeps_every_field() -> None:
    """The exit frame's optional fields survive the splice (nothing re-encoded, nothing lost)."""
    frame = TerminalExit(
        session_id="s1",
        channel_id="ch",
        seq=4,
        reason="timeout",
        exit_code=None,
        truncated=True,
        duration_s=1.5,
        stdout_bytes=10,
        stderr_bytes=1,
        error="killed",
    )
    up = decode_session_up(
        encode_spliced(SessionUp, {**STAMP, "session_id": "s1", "seq": 0}, encode(frame))
    )
    assert up.frame == frame


@pytest.mark.parametrize("raw", FRAMES)
def test_a_head_built_once_splices_every_frame_like_encode_spliced(raw: str) -> None:
    """One head for many frames (a connection's replies) gives encode_spliced's bytes."""
    head = spliced_head(CommandReply, STAMP)
    assert head + raw.encode() + b"}" == encode_spliced(CommandReply, STAMP, raw)
    assert decode_session_up(
        spliced_head(SessionUp, {**STAMP, "session_id": "s1", "seq": 2}) + raw.encode() + b"}"
    ).frame == decode_agent_to_server(raw)
