"""Pieces of the benchmark harness that decide a verdict or where results go, in isolation."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from bench.cli import complete_run
from bench.profiles import QUICK, SMOKE
from bench.results import Goal, Row
from bench.sampling import summarize
from bench.scenarios import SCENARIOS
from bench.scenarios.common import MARK_INTERVAL_S, StreamRun
from bench.scenarios.stream import _aggregate


def test_a_goal_fails_when_gurutunnel_has_no_value() -> None:
    """A storm that never finished, probes never answered: FAIL, never "not judged"."""
    assert Row("storm", "s", None, 7.4, "bare", Goal("ratio<=", 1.3)).passed is False
    assert Row("p99", "ms", None, goal=Goal("<=", 50)).passed is False
    assert Row("p99", "ms", float("nan"), goal=Goal("<=", 50)).passed is False


def test_a_ratio_goal_without_baseline_is_not_judged() -> None:
    assert Row("storm", "s", 9.0, None, "bare", Goal("ratio<=", 1.3)).passed is None


def test_goals_are_checked_in_their_direction() -> None:
    assert Row("rt", "ms", 1.4, 1.0, "b", Goal("ratio<=", 1.5)).passed is True
    assert Row("rt", "ms", 1.6, 1.0, "b", Goal("ratio<=", 1.5)).passed is False
    assert Row("tp", "1/s", 0.69, 1.0, "b", Goal("ratio>=", 0.7)).passed is False
    assert Row("tp", "1/s", 0.71, 1.0, "b", Goal("ratio>=", 0.7)).passed is True


def _run(started: float, ended: float, marks: list[tuple[float, int]]) -> StreamRun:
    run = StreamRun(received=marks[-1][1], started_at=started, ended_at=ended)
    run.marks = marks
    return run


def test_fairness_counts_shares_while_all_streams_competed() -> None:
    """A session starved at first that caught up alone at the end is not a fair share, though
    its average rate over its own duration is close to the others'."""
    fed = _run(0.0, 1.0, [(0.1 * i, 100 * i) for i in range(1, 11)])
    starved = _run(0.0, 1.2, [(0.5, 0), (1.0, 100), (1.2, 1000)])
    total, jain, shares = _aggregate([fed, starved])
    assert shares == [1000 / 1e6, 100 / 1e6]
    assert jain < 0.65
    # equal progress is index 1
    _, even, _ = _aggregate([fed, _run(0.0, 1.0, list(fed.marks))])
    assert even == 1.0
    assert total > 0


def test_marks_are_thinned_to_the_interval() -> None:
    run = StreamRun()
    for i in range(100):
        run.received += 1
        run.mark(i * MARK_INTERVAL_S / 4)
    assert len(run.marks) <= 25
    assert all(b[0] - a[0] >= MARK_INTERVAL_S for a, b in itertools.pairwise(run.marks))
    run.ended_at = 10.0
    moment = run.marks[2][0]
    assert run.received_at(moment) == run.marks[2][1]
    assert run.received_at(10.0) == 100  # at its end, all it received


def _document(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "profile": "full",
        "selected": list(SCENARIOS),
        "failed": False,
        "settings": {"profiled": [], "database": "SQLite file in the run's temp dir"},
    }
    return document | changes


def test_only_a_complete_full_run_replaces_the_docs_table() -> None:
    assert complete_run(_document())
    assert not complete_run(_document(profile="quick"))
    assert not complete_run(_document(selected=["roundtrip"]))
    assert not complete_run(_document(failed=True))
    assert not complete_run(_document(settings={"profiled": ["api"], "database": "SQLite"}))
    assert not complete_run(_document(settings={"profiled": [], "database": "PostgreSQL"}))


def test_sample_summary_shares_functions_inclusive_and_own() -> None:
    """py-spy's collapsed stacks: a function counts once per sample however deep it recurs,
    and its own share is the samples where it was the innermost frame."""
    collapsed = "\n".join(
        [
            "main (app/x.py:1);handle (app/y.py:5);query (db/z.py:9) 6",
            "main (app/x.py:1);handle (app/y.py:5);handle (app/y.py:7) 3",
            "main (app/x.py:2) 1",
            "not a sample line",
        ]
    )
    text = summarize(collapsed)
    assert text.startswith("10 samples")
    inclusive, own = text.split("own:")
    assert " 100.0%  main (x.py)" in inclusive
    assert "  90.0%  handle (y.py)" in inclusive
    assert "  60.0%  query (z.py)" in own
    assert "  30.0%  handle (y.py)" in own
    assert "  10.0%  main (x.py)" in own


def test_the_smoke_profile_is_the_quick_profiles_smallest_size_of_each_scenario() -> None:
    """Issue 5: the harness test runs quick's sizes (its smallest where it has several); only
    the measuring windows are shorter."""
    windows = {
        "name",
        "idle_steps",
        "tp_duration_s",
        "tp_warmup_s",
        "tp_rounds",
        "idle_settle_s",
        "idle_cpu_window_s",
        "stall_window_s",
        "agents_per_client_process",
    }
    smoke, quick = dataclasses.asdict(SMOKE), dataclasses.asdict(QUICK)
    assert {k: v for k, v in smoke.items() if k not in windows} == {
        k: v for k, v in quick.items() if k not in windows
    }
    assert SMOKE.idle_steps == [min(QUICK.idle_steps)]
    # the fleets are spread over several client processes, as the full profile's are
    assert SMOKE.agents_per_client_process < min(SMOKE.idle_steps[0], SMOKE.storm_agents)


def test_shares_are_interpolated_between_marks() -> None:
    """A stream's bytes at a moment between two marks, not those of the older mark."""
    run = StreamRun(received=300, started_at=0.0, ended_at=2.0, last_byte_at=2.0)
    run.marks = [(0.0, 0), (1.0, 100)]
    assert run.received_at(0.5) == 50
    assert run.received_at(1.5) == 200  # between the last mark and the last byte
    assert run.received_at(2.0) == 300
