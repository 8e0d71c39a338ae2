"""Subject builders and the id rules that keep subjects unbreakable."""

from __future__ import annotations

import pytest

from gurutunnel_protocol import InvalidIdError, Subjects, new_id, validate_id


def test_subjects_follow_the_contract_for_the_default_prefix() -> None:
    """Every subject has the documented shape under the default prefix."""
    s = Subjects()
    assert s.agent_commands("a1") == "gt.agent.a1.cmd"
    assert s.agent_events("a1", "heartbeat") == "gt.agent.a1.evt.heartbeat"
    assert s.all_agent_events() == "gt.agent.*.evt.>"
    assert s.presence("a1") == "gt.presence.a1"
    assert s.all_presence() == "gt.presence.*"
    assert s.session_up("s1") == "gt.session.s1.up"
    assert s.session_down("s1") == "gt.session.s1.down"
    assert s.all_sessions() == "gt.session.>"
    assert s.gateway_heartbeat() == "gt.gateway.heartbeat"
    assert s.gateway_control() == "gt.gateway.control"
    assert s.presence_stream == "GT_PRESENCE"
    assert s.revocation_bucket == "GT_REVOKED"


def test_a_multi_token_prefix_namespaces_everything() -> None:
    """A test prefix like 'tabc.gt' namespaces subjects, streams and buckets."""
    s = Subjects("tabc.gt")
    assert s.agent_commands("a") == "tabc.gt.agent.a.cmd"
    assert s.presence_stream == "TABC_GT_PRESENCE"
    assert s.revocation_bucket == "TABC_GT_REVOKED"


@pytest.mark.parametrize(
    "bad",
    ["", "a.b", "a*", ">", "a b", "a\tb", "a\nb", "a\x00b", "ä", "x" * 65, "a/b", "*"],
)
def test_ids_that_could_break_a_subject_are_refused(bad: str) -> None:
    """Dots, wildcards, whitespace, control characters and overlong ids are refused."""
    with pytest.raises(InvalidIdError):
        Subjects().agent_commands(bad)
    with pytest.raises(InvalidIdError):
        Subjects().session_up(bad)


@pytest.mark.parametrize("bad", ["", "gt.", ".gt", "g*t", "gt.>", "g t"])
def test_invalid_prefixes_are_refused(bad: str) -> None:
    """A prefix must be dot-joined safe tokens."""
    with pytest.raises(InvalidIdError):
        Subjects(bad)


def test_non_string_ids_are_refused() -> None:
    """validate_id refuses values that are not strings."""
    with pytest.raises(InvalidIdError):
        validate_id(42)


def test_new_ids_are_valid_and_distinct() -> None:
    """Fresh ids satisfy the id rule and do not repeat."""
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(validate_id(i) == i for i in ids)


def test_subjects_parse_back_what_they_build() -> None:
    """The session of an up subject and the kind of an event subject, under any prefix; None
    for a subject of another shape or another prefix."""
    for prefix in ("gt", "tabc.gt"):
        s = Subjects(prefix)
        assert s.up_session_id(s.session_up("s1")) == "s1"
        assert s.event_kind(s.agent_events("a1", "heartbeat")) == "heartbeat"
        assert s.up_session_id(s.session_down("s1")) is None
        assert s.up_session_id(s.agent_events("a1", "up")) is None
        assert s.event_kind(s.agent_commands("a1")) is None
        assert s.event_kind(s.presence("a1")) is None
    assert Subjects("gt").up_session_id(Subjects("other").session_up("s1")) is None
    assert Subjects("gt").event_kind(Subjects("tabc.gt").agent_events("a", "heartbeat")) is None
    assert Subjects("gt").up_session_id("gt.session.a.b.up") is None
    assert Subjects("gt").up_session_id("gt.session..up") is None
