"""Pure pieces of work inside a session: seq ordering, limit reasons, message shapes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from gurutunnel_api.db import utcnow
from gurutunnel_api.sessions.models import TechSession
from gurutunnel_api.work.limits import _reason
from gurutunnel_api.work.schemas import (
    ExecCreate,
    WsErrorOut,
    WsExitOut,
    WsStartedOut,
    ws_client_message,
    ws_text,
)
from gurutunnel_api.work.service import ChannelTracker, Chunk, Gap, OutputAcks
from gurutunnel_protocol.messages import ExitReason, OutputStream, TerminalChunk, TerminalExit


def _chunk(seq: int, data: bytes = b"x") -> TerminalChunk:
    return TerminalChunk(
        session_id="s", channel_id="c", seq=seq, stream=OutputStream.STDOUT, data=data
    )


def _exit(seq: int) -> TerminalExit:
    return TerminalExit(
        session_id="s",
        channel_id="c",
        seq=seq,
        reason=ExitReason.EXITED,
        exit_code=0,
        duration_s=0.1,
        stdout_bytes=1,
        stderr_bytes=0,
    )


def test_tracker_turns_a_seq_jump_into_one_inclusive_gap_and_drops_repeats() -> None:
    """0 then 3: gap {1, 2} before 3; a repeated 3 is dropped; the exit ends the channel."""
    t = ChannelTracker("c")
    assert t.accept(_chunk(0)) == [Chunk(0, OutputStream.STDOUT, b"x")]
    assert t.accept(_chunk(3, b"d")) == [Gap(1, 2), Chunk(3, OutputStream.STDOUT, b"d")]
    assert t.accept(_chunk(3, b"again")) == []
    exit_frame = _exit(5)
    assert t.accept(exit_frame) == [Gap(4, 4), exit_frame]
    assert t.accept(_chunk(6)) == [] and t.gaps == [Gap(1, 2), Gap(4, 4)]


def test_limit_reason_prefers_max_duration_and_counts_idle_from_the_last_activity() -> None:
    """Open past the max: max_duration; recent activity: none; stale activity: idle_timeout."""
    now = utcnow()
    row = TechSession(id="s", agent_id="a", tech_id="t", state="active")
    row.opened_at = now - timedelta(seconds=100)
    cut = {"idle_cutoff": now - timedelta(seconds=10), "max_cutoff": now - timedelta(seconds=50)}
    assert _reason(row, **cut) == "max_duration"
    row.opened_at = now - timedelta(seconds=20)
    assert _reason(row, **cut) == "idle_timeout"
    row.last_activity_at = now - timedelta(seconds=1)
    assert _reason(row, **cut) is None


def test_exec_body_needs_exactly_one_of_command_and_argv_and_no_extra_field() -> None:
    """Both, neither or an unknown field are refused; timeout_s is capped at 86400."""
    for body in ({}, {"command": "a", "argv": ["a"]}, {"command": "a", "shell": True}):
        with pytest.raises(ValidationError):
            ExecCreate.model_validate(body)
    with pytest.raises(ValidationError):
        ExecCreate.model_validate({"command": "a", "timeout_s": 86401})
    assert ExecCreate.model_validate({"argv": ["ls"]}).timeout_s == 300


def test_ws_messages_leave_unset_optionals_out_but_exit_keeps_every_field() -> None:
    """started/error omit id/pid/channel_id when unset; exit always has exit_code and error."""
    assert ws_text(WsStartedOut(channel_id="c", kind="shell")) == (
        '{"type":"started","channel_id":"c","kind":"shell"}'
    )
    assert '"id"' not in ws_text(WsErrorOut(code="x", message="m"))
    exit_text = ws_text(
        WsExitOut(
            channel_id="c",
            seq=1,
            reason=ExitReason.CANCELLED,
            exit_code=None,
            truncated=False,
            duration_s=0.5,
            stdout_bytes=0,
            stderr_bytes=0,
            error=None,
        )
    )
    assert '"exit_code":null' in exit_text and '"error":null' in exit_text


def test_ws_input_larger_than_64_kib_is_refused() -> None:
    """Keystrokes arrive in small pieces; a huge input message is a validation error."""
    import base64

    big = base64.b64encode(b"x" * (64 * 1024 + 1)).decode()
    with pytest.raises(ValidationError):
        ws_client_message.validate_json(f'{{"type":"input","channel_id":"c","data":"{big}"}}')
    ok = ws_client_message.validate_json('{"type":"input","channel_id":"c","data":"aGk="}')
    assert getattr(ok, "data", None) == b"hi"


# ---------------------------------------------------------------- output acknowledgements
def _took(acks: OutputAcks, seq: int, size: int) -> int | None:
    """A chunk arrived and was handed on; the ack to send, published."""
    acks.arrived(seq)
    ack = acks.consumed(seq, size)
    if ack is not None:
        acks.published(ack)
    return ack


def test_output_acks_come_every_quarter_window_of_consumed_output() -> None:
    acks = OutputAcks(8192)  # a quarter: 2048 of chunk cost (data + 256 per chunk)
    assert _took(acks, 0, 744) is None  # 1000
    assert _took(acks, 1, 800) == 1  # 2056 >= 2048
    assert _took(acks, 2, 1700) is None  # 1956
    assert _took(acks, 3, 0) == 3  # 2212


def test_output_acks_ack_the_first_chunk_past_a_gap_at_once() -> None:
    """Frames lost on the way hold window on the agent: an ack past them frees it. On a
    WebSocket the gap is routed before the chunks queued ahead of it are written: only a chunk
    past the gap triggers it."""
    acks = OutputAcks(1 << 20)
    acks.arrived(0)
    acks.gap(4)  # 1..4 lost
    acks.arrived(5)
    assert acks.consumed(0, 10) is None  # still before the gap
    assert acks.consumed(5, 10) == 5
    acks.published(5)
    assert _took(acks, 6, 10) is None


def test_output_acks_tick_resends_an_ack_that_did_not_go_out() -> None:
    acks = OutputAcks(8192)
    acks.arrived(0)
    assert acks.consumed(0, 3000) == 0  # its publish failed: published() not called
    assert acks.tick() == 0
    assert acks.tick() == 0  # again, until it goes out
    acks.published(0)
    acks.arrived(1)
    assert acks.tick() is None  # sent, and a frame arrived this tick: nothing to do


def test_output_acks_while_quiet_ack_past_anything_the_agent_sent_again_and_again() -> None:
    """Frames (or acks) lost at the end of a burst: nothing more arrives, and everything that
    did was consumed. The agent may have sent up to window / 256 + 2 frames past the last one:
    an ack beyond them frees its window. It is sent after 1, 2, 4, 8, 16, 32 quiet ticks and
    then every 32nd (a lost one is sent again; an idle shell costs little)."""
    acks = OutputAcks(8192)
    assert _took(acks, 0, 100) is None
    assert acks.tick() == 0  # consumed, not yet acknowledged
    acks.published(0)
    span = 8192 // 256 + 2
    sent = [n for n in range(1, 100) if acks.tick() == 0 + span]
    assert sent == [1, 2, 4, 8, 16, 32, 64, 96]
    # output again: the count starts over
    assert _took(acks, 1, 100) is None
    assert acks.tick() == 1
    acks.published(1)
    assert acks.tick() == 1 + span


def test_output_acks_first_tick_of_a_new_channel_only_starts_the_count() -> None:
    """The watcher may tick right after a channel started, its first window still on the
    way: that tick must not acknowledge past it."""
    acks = OutputAcks(8192)
    assert acks.tick() is None
    assert acks.tick() == -1 + 8192 // 256 + 2


def test_output_acks_never_run_ahead_of_a_reader_who_has_not_taken_the_output() -> None:
    """A quiet channel whose arrived output is still queued for the reader (a paused
    technician) is not acknowledged past it: the agent waits for the reader."""
    acks = OutputAcks(8192)
    acks.arrived(0)
    acks.arrived(1)
    assert acks.consumed(0, 100) is None
    assert acks.tick() == 0  # consumed, not yet acknowledged
    acks.published(0)
    assert acks.tick() is None  # 1 is still queued: no ack past it
