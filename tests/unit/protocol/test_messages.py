"""Round trips of every wire message and refusal of malformed frames."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from gurutunnel_protocol import ErrorCode, ProtocolError
from gurutunnel_protocol.envelope import (
    decode_agent_command,
    decode_agent_to_server,
    decode_command_result,
    decode_control,
    decode_gateway_heartbeat,
    decode_presence,
    decode_server_to_agent,
    decode_session_up,
    encode,
    encode_text,
)
from gurutunnel_protocol.messages import (
    AgentConnected,
    AgentDisconnected,
    AgentRevoked,
    ChannelClose,
    ChannelClosed,
    ChannelOpen,
    ChannelOpened,
    ChannelType,
    CommandFailed,
    CommandReply,
    ConnectionTakeover,
    DisconnectReason,
    ErrorFrame,
    ExitReason,
    FileAck,
    FileCancel,
    FileChunk,
    FileDone,
    FileDownload,
    FileFailed,
    FileReady,
    FileUpload,
    GatewayHeartbeat,
    Heartbeat,
    HostMetrics,
    OutputStream,
    Reconnect,
    SessionUp,
    ShellOpen,
    ShellResize,
    Terminal,
    TerminalCancel,
    TerminalChunk,
    TerminalExit,
    TerminalStarted,
    TunnelClose,
    TunnelClosed,
    TunnelData,
    TunnelError,
    TunnelOpen,
    TunnelReady,
    Welcome,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
METRICS = HostMetrics(
    hostname="host-1",
    os="Linux",
    cpu_percent=12.5,
    cpu_count=2,
    mem_total_bytes=1 << 30,
    mem_used_percent=40.0,
    disk_total_bytes=1 << 40,
    disk_used_percent=50.0,
    boot_time=NOW,
)
SHA = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
STAMP: dict[str, Any] = {"agent_id": "a1", "gateway_id": "g1", "boot_id": "b1", "conn_id": "c1"}

SERVER_TO_AGENT: list[BaseModel] = [
    Welcome(agent_id="a1", conn_id="c1", gateway_id="g1", heartbeat_interval_s=30),
    ErrorFrame(code=ErrorCode.MALFORMED_FRAME, message="bad", req_id="r1"),
    Reconnect(delay_ms=1500),
    TunnelOpen(req_id="r1", session_id="s1", tech_id="t1"),
    TunnelClose(req_id="r2", session_id="s1", reason="user"),
    TunnelData(session_id="s1", channel_id="ch1", data=b"\x00\xffbytes"),
    ChannelOpen(req_id="r3", session_id="s1", channel_id="ch1", channel_type=ChannelType.TERMINAL),
    ChannelClose(req_id="r4", session_id="s1", channel_id="ch1"),
    Terminal(req_id="r5", session_id="s1", channel_id="ch1", command="echo hi"),
    Terminal(req_id="r6", session_id="s1", channel_id="ch2", argv=["ls", "-l"], cwd="/tmp"),
    TerminalCancel(session_id="s1", channel_id="ch1"),
    ShellOpen(req_id="r7", session_id="s1", channel_id="sh1", cols=120, rows=40),
    ShellResize(session_id="s1", channel_id="sh1", cols=100, rows=30),
    FileUpload(
        req_id="r8", session_id="s1", channel_id="f1", path="/srv/a.bin", size=3, sha256=SHA
    ),
    FileDownload(req_id="r9", session_id="s1", channel_id="f2", path="/srv/b.bin", offset=10),
    FileChunk(session_id="s1", channel_id="f1", offset=0, data=b"abc"),
    FileAck(session_id="s1", channel_id="f2", offset=4096),
    FileCancel(session_id="s1", channel_id="f1"),
]
AGENT_TO_SERVER: list[BaseModel] = [
    Heartbeat(sent_at=NOW, mode="heartbeat", metrics=METRICS),
    TunnelReady(req_id="r1", session_id="s1"),
    TunnelClosed(req_id="r2", session_id="s1"),
    TunnelData(session_id="s1", channel_id="ch1", data=b"out"),
    TunnelError(req_id="r1", session_id="s1", code=ErrorCode.TUNNEL_BUSY, error="busy"),
    ChannelOpened(req_id="r3", session_id="s1", channel_id="ch1", channel_type=ChannelType.FILE),
    ChannelClosed(req_id="r4", session_id="s1", channel_id="ch1"),
    TerminalStarted(req_id="r5", session_id="s1", channel_id="ch1", pid=77),
    TerminalChunk(
        session_id="s1", channel_id="ch1", seq=0, stream=OutputStream.STDERR, data=b"\x1b[31m"
    ),
    TerminalExit(
        session_id="s1",
        channel_id="ch1",
        seq=1,
        reason=ExitReason.TIMEOUT,
        exit_code=None,
        truncated=True,
        duration_s=1.5,
        stdout_bytes=10,
        stderr_bytes=0,
    ),
    FileReady(
        req_id="r9",
        session_id="s1",
        channel_id="f2",
        offset=10,
        size=20,
        sha256=SHA,
        window_bytes=1 << 22,
        chunk_bytes=1 << 18,
    ),
    FileChunk(session_id="s1", channel_id="f2", offset=10, data=b"\x00" * 10),
    FileAck(session_id="s1", channel_id="f1", offset=3),
    FileDone(session_id="s1", channel_id="f1", path="/srv/a.bin", size=3, sha256=SHA),
    FileFailed(session_id="s1", channel_id="f1", code=ErrorCode.HASH_MISMATCH, error="x", offset=0),
]


@pytest.mark.parametrize("frame", SERVER_TO_AGENT, ids=lambda f: f.type)
def test_server_to_agent_frames_round_trip(frame: BaseModel) -> None:
    """Every server->agent frame decodes back to an equal model."""
    assert decode_server_to_agent(encode(frame)) == frame
    assert decode_server_to_agent(encode_text(frame)) == frame


@pytest.mark.parametrize("frame", AGENT_TO_SERVER, ids=lambda f: f.type)
def test_agent_to_server_frames_round_trip(frame: BaseModel) -> None:
    """Every agent->server frame decodes back to an equal model."""
    assert decode_agent_to_server(encode(frame)) == frame


def _inline_answer(**changes: Any) -> dict[str, Any]:
    chunk = {"type": "terminal.chunk", "session_id": "s1", "channel_id": "ch1", "seq": 0}
    exit_ = {
        "type": "terminal.exit",
        "session_id": "s1",
        "channel_id": "ch1",
        "seq": 1,
        "reason": "exited",
        "exit_code": 0,
        "duration_s": 0.01,
        "stdout_bytes": 3,
        "stderr_bytes": 0,
    }
    answer = {
        "type": "terminal.started",
        "req_id": "r5",
        "session_id": "s1",
        "channel_id": "ch1",
        "output": [chunk | {"stream": "stdout", "data": "aGkK"}],
        "exit": exit_,
    }
    return answer | changes


def test_a_started_answer_carrying_output_and_exit_round_trips() -> None:
    """terminal.started with its channel's chunk and exit decodes to the same frames."""
    frame = decode_agent_to_server(json.dumps(_inline_answer()))
    assert isinstance(frame, TerminalStarted) and frame.exit is not None
    assert [(c.seq, c.data) for c in frame.output] == [(0, b"hi\n")]
    assert decode_agent_to_server(encode(frame)) == frame


@pytest.mark.parametrize(
    "changes",
    [
        {"exit": None, "output": []} | {"channel_id": "other"},
        {"output": []},  # the exit alone must be seq 0
        {
            "exit": None,
            "output": [
                {
                    "type": "terminal.chunk",
                    "session_id": "s1",
                    "channel_id": "ch2",
                    "seq": 0,
                    "stream": "stdout",
                    "data": "",
                }
            ],
        },
    ],
    ids=["answer-for-another-channel", "exit-seq-gap", "chunk-of-another-channel"],
)
def test_inline_frames_that_do_not_continue_the_channel_are_refused(
    changes: dict[str, Any],
) -> None:
    """Inline frames must belong to the answered channel and be numbered 0, 1, ... ."""
    raw = _inline_answer(**changes)
    if changes.get("channel_id") == "other":
        raw["output"] = [
            {
                "type": "terminal.chunk",
                "session_id": "s1",
                "channel_id": "ch1",
                "seq": 0,
                "stream": "stdout",
                "data": "",
            }
        ]
    with pytest.raises(ProtocolError) as caught:
        decode_agent_to_server(json.dumps(raw))
    assert caught.value.code == ErrorCode.MALFORMED_FRAME


def test_bus_messages_round_trip() -> None:
    """Presence, control, command results, session frames and gateway heartbeats round-trip."""
    connected = AgentConnected(**STAMP, event_id="e1", at=NOW)
    disconnected = AgentDisconnected(
        **STAMP, event_id="e2", at=NOW, reason=DisconnectReason.PING_TIMEOUT, close_code=1011
    )
    assert decode_presence(encode(connected)) == connected
    assert decode_presence(encode(disconnected)) == disconnected
    revoked = AgentRevoked(agent_id="a1", not_before=NOW)
    takeover = ConnectionTakeover(**STAMP, connected_seq=7, at=NOW)
    assert decode_control(encode(revoked)) == revoked
    assert decode_control(encode(takeover)) == takeover
    reply = CommandReply(**STAMP, frame=TunnelReady(req_id="r1", session_id="s1"))
    failed = CommandFailed(
        agent_id="a1", gateway_id="g1", code=ErrorCode.AGENT_OFFLINE, message="x"
    )
    assert decode_command_result(encode(reply)) == reply
    assert decode_command_result(encode(failed)) == failed
    up = SessionUp(
        **STAMP,
        session_id="s1",
        seq=7,
        frame=TunnelData(session_id="s1", channel_id="c", data=b"x"),
    )
    assert decode_session_up(encode(up)) == up
    beat = GatewayHeartbeat(gateway_id="g1", boot_id="b1", at=NOW, agents=3, lease_ttl_s=6)
    assert decode_gateway_heartbeat(encode(beat)) == beat


def test_tunnel_data_bytes_travel_as_base64() -> None:
    """Binary data is standard base64 in JSON and raw bytes in Python."""
    wire = json.loads(encode(TunnelData(session_id="s", channel_id="c", data=b"\x00\x01\xfe")))
    assert wire["data"] == "AAH+"
    assert wire["v"] == 1 and wire["type"] == "tunnel.data"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{", ErrorCode.MALFORMED_FRAME),
        (b"\xff\xfe", ErrorCode.MALFORMED_FRAME),
        (b"[1, 2]", ErrorCode.MALFORMED_FRAME),
        (b'"text"', ErrorCode.MALFORMED_FRAME),
        (b"{}", ErrorCode.UNKNOWN_TYPE),
        (b'{"type": "tunnel.explode"}', ErrorCode.UNKNOWN_TYPE),
        (b'{"type": 5}', ErrorCode.UNKNOWN_TYPE),
        (b'{"type": "tunnel.ready"}', ErrorCode.MALFORMED_FRAME),
        (b'{"type": "tunnel.ready", "session_id": "a.b"}', ErrorCode.MALFORMED_FRAME),
        (b'{"type": "tunnel.ready", "session_id": "a*"}', ErrorCode.MALFORMED_FRAME),
        (b'{"type": "tunnel.ready", "session_id": "s", "v": 2}', ErrorCode.UNSUPPORTED_VERSION),
        (b'{"type": "nope", "v": 9}', ErrorCode.UNSUPPORTED_VERSION),
        (
            b'{"type": "tunnel.data", "session_id": "s", "channel_id": "c", "data": "@@"}',
            ErrorCode.MALFORMED_FRAME,
        ),
        (b'{"type": "tunnel.error", "code": "made_up", "error": "x"}', ErrorCode.MALFORMED_FRAME),
    ],
)
def test_malformed_agent_frames_are_refused_with_a_code(raw: bytes, code: ErrorCode) -> None:
    """Malformed, unknown and wrong-version frames raise ProtocolError with the right code."""
    with pytest.raises(ProtocolError) as info:
        decode_agent_to_server(raw)
    assert info.value.code == code
    assert len(info.value.message) <= 512


def test_oversized_frame_is_refused_before_parsing() -> None:
    """A frame above max_bytes is refused with frame_too_large."""
    big = encode(TunnelData(session_id="s", channel_id="c", data=b"x" * 2000))
    with pytest.raises(ProtocolError) as info:
        decode_agent_to_server(big, max_bytes=1000)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_direction_unions_refuse_frames_of_the_other_direction() -> None:
    """An agent cannot send a server frame, and the API cannot command a welcome."""
    with pytest.raises(ProtocolError):
        decode_agent_to_server(encode(TunnelOpen(session_id="s", tech_id="t")))
    with pytest.raises(ProtocolError):
        decode_server_to_agent(encode(TunnelReady(session_id="s")))
    with pytest.raises(ProtocolError):
        decode_agent_command(
            encode(Welcome(agent_id="a", conn_id="c", gateway_id="g", heartbeat_interval_s=1))
        )


def test_unknown_fields_are_ignored_so_identity_cannot_be_injected() -> None:
    """Extra fields (such as a forged agent_id) are dropped, not kept."""
    frame = decode_agent_to_server(b'{"type": "tunnel.ready", "session_id": "s", "agent_id": "x"}')
    assert "agent_id" not in frame.model_dump()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type": "terminal.command", "session_id": "s", "channel_id": "c"}',
        b'{"type": "terminal.command", "session_id": "s", "channel_id": "c", "command": "id",'
        b' "argv": ["id"]}',
        b'{"type": "terminal.command", "session_id": "s", "channel_id": "c", "argv": []}',
        b'{"type": "terminal.command", "session_id": "s", "channel_id": "c", "command": "x",'
        b' "timeout_s": 0}',
        b'{"type": "shell.open", "session_id": "s", "channel_id": "c", "cols": 0}',
    ],
)
def test_invalid_terminal_requests_are_refused(raw: bytes) -> None:
    """A command needs exactly one of command/argv, a positive timeout; a PTY a sane size."""
    with pytest.raises(ProtocolError) as info:
        decode_server_to_agent(raw)
    assert info.value.code == ErrorCode.MALFORMED_FRAME


def test_every_request_has_replies_and_every_reply_can_answer() -> None:
    """REPLIES_BY_REQUEST covers exactly the request types; each reply is in AgentReply."""
    from typing import get_args

    from gurutunnel_protocol.messages import (
        REPLIES_BY_REQUEST,
        REPLY_TYPES,
        REQUEST_TYPES,
        AgentReply,
    )

    request_tags = {t.model_fields["type"].default for t in REQUEST_TYPES}
    assert set(REPLIES_BY_REQUEST) == request_tags
    reply_members = set(get_args(get_args(AgentReply)[0]))
    assert set(REPLY_TYPES) == reply_members
    for replies in REPLIES_BY_REQUEST.values():
        assert set(replies) <= reply_members


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type": "file.upload", "session_id": "s", "channel_id": "c", "path": "/a",'
        b' "size": 1, "sha256": "ABC"}',
        b'{"type": "file.upload", "session_id": "s", "channel_id": "c", "path": "/a\\u0000b",'
        b' "size": 1, "sha256": "' + b"a" * 64 + b'"}',
        b'{"type": "file.upload", "session_id": "s", "channel_id": "c", "path": "/a",'
        b' "size": -1, "sha256": "' + b"a" * 64 + b'"}',
        b'{"type": "file.download", "session_id": "s", "channel_id": "c", "path": ""}',
    ],
)
def test_invalid_file_requests_are_refused(raw: bytes) -> None:
    """Digests are 64 lowercase hex, paths non-empty without NUL, sizes non-negative."""
    with pytest.raises(ProtocolError) as info:
        decode_server_to_agent(raw)
    assert info.value.code == ErrorCode.MALFORMED_FRAME
