"""The benchmark harness works: the quick profile's smallest size of every scenario runs and
reports numbers.

This checks the harness (processes start, every scenario completes, the JSON holds numbers and
ratios), never a speed: benchmarks themselves do not run inside the test command.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from pathlib import Path

from bench import report
from bench.scenarios import SCENARIOS
from bench.scenarios.common import echo_command_bytes
from bench.simagent import chunk_text, echo_answer_text, pattern_bytes
from gurutunnel_protocol.envelope import decode_agent_to_server, encode, encode_text
from gurutunnel_protocol.messages import (
    ExitReason,
    Terminal,
    TerminalChunk,
    TerminalExit,
    TerminalStarted,
)

ROOT = Path(__file__).resolve().parents[2]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_smoke_profile_reports_every_scenario_with_numbers_and_ratios(tmp_path: Path) -> None:
    """``python -m bench --smoke`` completes every scenario, writes numbers and ratios to the
    JSON file and its table into a copy of docs/benchmarks.md, between the markers only."""
    docs = tmp_path / "benchmarks.md"
    original = (ROOT / "docs" / "benchmarks.md").read_text()
    docs.write_text(original)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--no-plots",
            "--docs",
            str(docs),
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    [result_file] = tmp_path.glob("*.json")
    document = json.loads(result_file.read_text())
    assert document["profile"] == "smoke"
    assert set(document["scenarios"]) == set(SCENARIOS)
    for name, scenario in document["scenarios"].items():
        assert scenario["error"] is None, (name, scenario["error"])
        rows = scenario["rows"]
        assert rows, name
        assert all(_number(row["gurutunnel"]) for row in rows), (name, rows)
        compared = [row for row in rows if row["baseline"] is not None]
        assert compared, f"{name}: no row compared with a baseline"
        assert all(_number(row["ratio"]) for row in compared if row["baseline"]), (name, rows)
        for row in rows:
            if row["goal"] is not None:
                assert row["passed"] in (True, False), (name, row)
    assert document["machine"]["logical_cores"] >= 1
    assert document["machine"]["nats_server"].startswith("nats-server")

    written = docs.read_text()
    begin, end = written.index(report.BEGIN), written.index(report.END)
    old_begin, old_end = original.index(report.BEGIN), original.index(report.END)
    # the hand-written text around the generated section is kept as it was
    assert written[:begin] == original[:old_begin]
    assert written[end:] == original[old_end:]
    section = written[begin:end]
    assert "smoke profile" in section
    for name, scenario in document["scenarios"].items():
        for row in scenario["rows"]:
            assert f"| {scenario['number']} | {row['metric']} |" in section, (name, row["metric"])


def test_simulated_agent_chunks_are_what_the_codec_encodes() -> None:
    """The hand-built ``terminal.chunk`` text of the simulated agent equals the codec's."""
    data = pattern_bytes(123, 4096)
    frame = TerminalChunk(session_id="s1", channel_id="c1", seq=7, stream="stdout", data=data)
    by_hand = chunk_text("s1", "c1", 7, base64.b64encode(data).decode("ascii"))
    assert by_hand == encode_text(frame)
    assert decode_agent_to_server(by_hand) == frame


def test_simulated_agent_echo_answer_is_what_the_codec_encodes() -> None:
    """The hand-built ``bench echo`` answer (started + chunk + exit) equals the codec's."""
    frame = TerminalStarted(
        req_id="r1",
        session_id="s1",
        channel_id="c1",
        output=[
            TerminalChunk(session_id="s1", channel_id="c1", seq=0, stream="stdout", data=b"ok\n")
        ],
        exit=TerminalExit(
            session_id="s1",
            channel_id="c1",
            seq=1,
            reason=ExitReason.EXITED,
            exit_code=0,
            duration_s=0.0,
            stdout_bytes=3,
            stderr_bytes=0,
        ),
    )
    by_hand = echo_answer_text("r1", "s1", "c1")
    assert by_hand == encode_text(frame)
    assert decode_agent_to_server(by_hand) == frame


def test_throughput_requests_are_what_the_codec_encodes() -> None:
    """The hand-built ``bench echo`` request of scenario 2 equals the API's encoding."""
    frame = Terminal(
        req_id="r1",
        session_id="s1",
        channel_id="c1",
        command="bench echo",
        timeout_s=30,
        inline_result=True,
        window_bytes=256 * 1024,
    )
    assert echo_command_bytes("r1", "s1", "c1") == encode(frame)
