"""py-spy sampling of the API or the gateways during a run (``--sample api|gateway``).

:meth:`Samplers.attach` starts ``py-spy record`` on one process: ``--gil`` keeps only the
samples where the process holds the GIL (where its Python CPU goes, idle waits left out) and
``--nonblocking`` never pauses it, so the profiled run stays close to an unprofiled one (unlike
an in-process profiler). Collapsed stacks go to ``<dir>/<name>-<pid>.stacks``; py-spy writes
them when its target exits or when :meth:`Samplers.stop` interrupts it (SIGINT, bounded, then
killed; :meth:`Samplers.stop` with a pid stops one recorder, before a scenario stops that
process). :func:`summarize` turns them into ``<name>-<pid>.txt``: the functions by their share
of the samples, inclusive (the function and what it called) and own, or why there are none.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

RATE_HZ = 250
STOP_TIMEOUT_S = 15.0
TOP = 60


def py_spy() -> str | None:
    """The py-spy executable: beside this Python (the project's venv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Samplers:
    """The py-spy recorders of one run."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._running: list[tuple[int, subprocess.Popen[bytes], Path]] = []

    def attach(self, name: str, pid: int) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (requirements-bench.txt)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stacks = self.out_dir / f"{name}-{pid}.stacks"
        log = (self.out_dir / f"{name}-{pid}.log").open("wb")
        with log:
            command = [exe, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--gil"]
            command += ["--nonblocking", "--format", "raw", "--output", str(stacks)]
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._running.append((pid, proc, stacks))

    def stop(self, pid: int | None = None) -> None:
        """Interrupt the recorders (of ``pid`` only, when given), then write each one's summary:
        its functions, or why there is none (py-spy's log: it could not attach, ...)."""
        stopping = [r for r in self._running if pid is None or r[0] == pid]
        self._running = [r for r in self._running if r not in stopping]
        for _, proc, _ in stopping:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for _, proc, stacks in stopping:
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            summary = stacks.with_suffix(".txt")
            try:
                if stacks.exists() and stacks.stat().st_size > 0:
                    summary.write_text(summarize(stacks.read_text(errors="replace")))
                else:
                    log = stacks.with_suffix(".log").read_text(errors="replace")[-2000:]
                    summary.write_text(
                        f"py-spy wrote no samples (exit {proc.returncode}); its log:\n{log}"
                    )
            except OSError as exc:  # one recorder's file: never the others' or the run's end
                with contextlib.suppress(OSError):
                    summary.write_text(f"no summary: {exc}\n")


def _function(frame: str) -> str:
    """``name (path/to/file.py:12)`` -> ``name (file.py)``: one line per function."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})" if file else name


def summarize(collapsed: str, top: int = TOP) -> str:
    """The functions of py-spy's collapsed stacks (``frame;frame;... count`` per line) by their
    share of the samples: inclusive, then own."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            count = int(count_text)
            frames = [_function(f) for f in stack.split(";") if f]
            if not frames:
                continue
            total += count
            for function in set(frames):
                inclusive[function] += count
            own[frames[-1]] += count

    def shares(counter: collections.Counter[str]) -> list[str]:
        return [f"{100 * n / total:6.1f}%  {f}" for f, n in counter.most_common(top)]

    lines = [f"{total} samples holding the GIL ({RATE_HZ} Hz)", "", "inclusive:"]
    lines += [*shares(inclusive), "", "own:", *shares(own)] if total else ["", "own:"]
    return "\n".join(lines) + "\n"
