"""Unit tests of the tunnel state machine's file-transfer frames (no sockets, no files)."""

from __future__ import annotations

import pytest

from gurutunnel_agent.tunnel import (
    EndSession,
    FileAcked,
    FileData,
    StartDownload,
    StartUpload,
    StopChannel,
    TunnelManager,
)
from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages import (
    ChannelClose,
    ChannelClosed,
    ChannelType,
    ExitReason,
    FileAck,
    FileCancel,
    FileChunk,
    FileDownload,
    FileUpload,
    Terminal,
    TunnelClose,
    TunnelError,
)

SHA = "0" * 64


def _upload(channel_id: str = "f1", session_id: str = "s1") -> FileUpload:
    return FileUpload(
        req_id="up",
        session_id=session_id,
        channel_id=channel_id,
        path="/tmp/x",
        size=3,
        sha256=SHA,
    )


def _download(channel_id: str = "f2", session_id: str = "s1") -> FileDownload:
    return FileDownload(req_id="down", session_id=session_id, channel_id=channel_id, path="/tmp/x")


@pytest.fixture
def tunnel() -> TunnelManager:
    t = TunnelManager(max_channels=2)
    t.open_tunnel("s1", "tech1")
    return t


def test_upload_and_download_register_a_file_channel_and_start_it(tunnel: TunnelManager) -> None:
    """file.upload / file.download -> StartUpload / StartDownload with distinct tokens."""
    [up] = tunnel.handle(_upload())
    [down] = tunnel.handle(_download())
    assert isinstance(up, StartUpload)
    assert isinstance(down, StartDownload)
    assert up.frame == _upload()
    assert down.frame == _download()
    assert up.token != down.token
    assert tunnel.channels == {"f1": ChannelType.FILE, "f2": ChannelType.FILE}


@pytest.mark.parametrize(
    ("setup", "frame", "code"),
    [
        (False, _upload(session_id="other"), ErrorCode.NO_SUCH_SESSION),
        (True, _upload(channel_id="t1"), ErrorCode.CHANNEL_EXISTS),
        (True, _download(channel_id="t1"), ErrorCode.CHANNEL_EXISTS),
    ],
    ids=["other-session", "upload-on-open-id", "download-on-open-id"],
)
def test_refused_transfer_answers_tunnel_error_with_req_id(
    tunnel: TunnelManager, setup: bool, frame: FileUpload | FileDownload, code: ErrorCode
) -> None:
    """The terminal.command checks apply: the refusal echoes req_id and opens nothing."""
    if setup:
        tunnel.handle(Terminal(session_id="s1", channel_id="t1", command="true"))
    before = tunnel.channels
    [answer] = tunnel.handle(frame)
    assert isinstance(answer, TunnelError)
    assert (answer.code, answer.req_id, answer.channel_id) == (code, frame.req_id, frame.channel_id)
    assert tunnel.channels == before


def test_transfer_beyond_max_channels_is_too_many_channels(tunnel: TunnelManager) -> None:
    """A third channel with max_channels=2 is refused too_many_channels."""
    tunnel.handle(_upload("f1"))
    tunnel.handle(_download("f2"))
    [answer] = tunnel.handle(_download("f3"))
    assert isinstance(answer, TunnelError)
    assert answer.code is ErrorCode.TOO_MANY_CHANNELS


def test_chunk_and_ack_reach_only_a_transfer_of_their_direction(tunnel: TunnelManager) -> None:
    """file.chunk -> FileData on an upload, file.ack -> FileAcked on a download; else dropped."""
    tunnel.handle(_upload("f1"))
    tunnel.handle(_download("f2"))
    chunk = FileChunk(session_id="s1", channel_id="f1", offset=0, data=b"abc")
    assert tunnel.handle(chunk) == [FileData("s1", "f1", chunk)]
    assert tunnel.handle(FileAck(session_id="s1", channel_id="f2", offset=5)) == [
        FileAcked("s1", "f2", 5)
    ]
    # wrong direction, unknown channel, other session: dropped without an answer
    assert tunnel.handle(FileChunk(session_id="s1", channel_id="f2", offset=0, data=b"x")) == []
    assert tunnel.handle(FileAck(session_id="s1", channel_id="f1", offset=1)) == []
    assert tunnel.handle(FileChunk(session_id="s1", channel_id="zz", offset=0, data=b"x")) == []
    assert tunnel.handle(FileAck(session_id="other", channel_id="f2", offset=1)) == []


def test_chunk_for_a_terminal_channel_is_dropped(tunnel: TunnelManager) -> None:
    """A file frame naming a command channel is not handed to it (and not answered)."""
    tunnel.handle(Terminal(session_id="s1", channel_id="t1", command="true"))
    assert tunnel.handle(FileChunk(session_id="s1", channel_id="t1", offset=0, data=b"x")) == []
    assert tunnel.handle(FileCancel(session_id="s1", channel_id="t1")) == []


def test_cancel_stops_the_transfer_without_waiting(tunnel: TunnelManager) -> None:
    """file.cancel -> StopChannel(cancelled, wait=False); unknown channel: dropped."""
    tunnel.handle(_upload("f1"))
    assert tunnel.handle(FileCancel(session_id="s1", channel_id="f1")) == [
        StopChannel("s1", "f1", ExitReason.CANCELLED, wait=False)
    ]
    assert tunnel.handle(FileCancel(session_id="s1", channel_id="f9")) == []


def test_released_transfer_drops_late_chunks_and_frees_the_id(tunnel: TunnelManager) -> None:
    """After release a late file.chunk is dropped and the id may start a download."""
    [up] = tunnel.handle(_upload("f1"))
    assert isinstance(up, StartUpload)
    assert tunnel.release_channel("s1", "f1", up.token) is True
    assert tunnel.handle(FileChunk(session_id="s1", channel_id="f1", offset=0, data=b"x")) == []
    [down] = tunnel.handle(_download("f1"))
    assert isinstance(down, StartDownload)
    assert tunnel.handle(FileAck(session_id="s1", channel_id="f1", offset=0)) == [
        FileAcked("s1", "f1", 0)
    ]


def test_channel_close_and_tunnel_close_end_transfers_through_the_usual_paths(
    tunnel: TunnelManager,
) -> None:
    """channel.close -> awaited StopChannel; tunnel.close -> EndSession; late frames dropped."""
    tunnel.handle(_upload("f1"))
    tunnel.handle(_download("f2"))
    closed = tunnel.handle(ChannelClose(req_id="c", session_id="s1", channel_id="f1"))
    assert closed == [
        StopChannel("s1", "f1", ExitReason.CANCELLED, wait=True),
        ChannelClosed(req_id="c", session_id="s1", channel_id="f1"),
    ]
    assert tunnel.handle(FileChunk(session_id="s1", channel_id="f1", offset=0, data=b"x")) == []
    items = tunnel.handle(TunnelClose(req_id="t", session_id="s1"))
    assert items[0] == EndSession("s1")
    assert tunnel.handle(FileAck(session_id="s1", channel_id="f2", offset=0)) == []
