"""A channel's held output when the answer that should carry it never leaves."""

from __future__ import annotations

from gurutunnel_agent.channels.output import ChannelOutput
from gurutunnel_agent.channels.terminal import best_effort_exit
from gurutunnel_protocol.messages import AgentToServer, ExitReason, OutputStream, TerminalExit


def _output() -> tuple[ChannelOutput, list[AgentToServer]]:
    sent: list[AgentToServer] = []

    async def emit(frame: AgentToServer) -> None:
        sent.append(frame)

    return ChannelOutput("s1", "c1", emit, hold_bytes=1024), sent


async def _abandon(output: ChannelOutput) -> None:
    await best_effort_exit(
        output,
        ExitReason.SESSION_CLOSED,
        exit_code=None,
        duration_s=0.1,
        stdout_bytes=3,
        stderr_bytes=0,
        error="the channel did not end in time; its process tree was killed",
        abandoned=True,
    )


async def test_an_exit_held_in_an_answer_that_never_left_is_sent_again_when_abandoned() -> None:
    """The command ended in the window (exit held for the answer); the answer was cancelled
    while sending: the abandoned channel still ends with an exit frame, numbered after the
    frames that were lost with the answer (the reader sees the gap)."""
    output, sent = _output()
    output.answer_opens()
    await output.chunk(OutputStream.STDOUT, b"hi\n")
    await output.exit(
        ExitReason.EXITED, exit_code=0, duration_s=0.01, stdout_bytes=3, stderr_bytes=0
    )
    chunks, held_exit = await output.settle(1.0)
    assert len(chunks) == 1 and held_exit is not None and sent == []
    output.not_delivered(held_exit)
    await _abandon(output)
    assert len(sent) == 1 and isinstance(sent[0], TerminalExit)
    assert (sent[0].seq, sent[0].reason) == (2, ExitReason.SESSION_CLOSED)


async def test_an_abandoned_channel_whose_answer_never_ran_still_sends_its_exit() -> None:
    """Output still holding (the answer's task was cancelled before it settled): the
    abandoned channel's exit frame leaves, not held for an answer that will never be sent."""
    output, sent = _output()
    output.answer_opens()
    await _abandon(output)
    assert len(sent) == 1 and isinstance(sent[0], TerminalExit)
    assert sent[0].seq == 0


async def test_a_delivered_answer_keeps_the_exit_it_carried() -> None:
    """Only an answer that did not leave gives its exit back: no second exit otherwise."""
    output, sent = _output()
    output.answer_opens()
    await output.exit(
        ExitReason.EXITED, exit_code=0, duration_s=0.01, stdout_bytes=0, stderr_bytes=0
    )
    await output.settle(1.0)
    output.open()
    await _abandon(output)
    assert sent == []
