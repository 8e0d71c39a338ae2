"""Unit tests of the terminal channel's pure parts: cwd policy, output cap, exit reasons."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from gurutunnel_agent.channels.process import child_environment
from gurutunnel_agent.channels.shell import shell_command
from gurutunnel_agent.channels.terminal import (
    OutputBudget,
    exit_outcome,
    open_cwd,
    open_dir,
    platform_argv,
    resolve_cwd,
    spawn_error_text,
)
from gurutunnel_agent.config import AgentSettings
from gurutunnel_agent.tunnel import CwdNotAllowed
from gurutunnel_protocol import ErrorCode
from gurutunnel_protocol.messages import ExitReason, OutputStream, Terminal


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed root with a subdirectory, and a directory outside it."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    return allowed, outside


def test_cwd_inside_allowlist_resolves_to_its_real_path(roots: tuple[Path, Path]) -> None:
    """A subdirectory of an allowed root is allowed and returned as its real path."""
    allowed, _ = roots
    assert resolve_cwd(str(allowed / "sub"), [allowed]) == (allowed / "sub").resolve()
    assert resolve_cwd(str(allowed), [allowed]) == allowed.resolve()


def test_no_cwd_means_the_first_allowlist_entry(roots: tuple[Path, Path]) -> None:
    """cwd None runs in the first root."""
    allowed, outside = roots
    assert resolve_cwd(None, [outside, allowed]) == outside.resolve()


def test_cwd_outside_allowlist_is_refused(roots: tuple[Path, Path]) -> None:
    """A directory outside every root raises CwdNotAllowed (code cwd_not_allowed)."""
    allowed, outside = roots
    with pytest.raises(CwdNotAllowed) as info:
        resolve_cwd(str(outside), [allowed])
    assert info.value.code is ErrorCode.CWD_NOT_ALLOWED


def test_dotdot_traversal_out_of_a_root_is_refused(roots: tuple[Path, Path]) -> None:
    """allowed/sub/../../outside resolves outside the root and is refused."""
    allowed, _ = roots
    with pytest.raises(CwdNotAllowed):
        resolve_cwd(str(allowed / "sub" / ".." / ".." / "outside"), [allowed])


def test_sibling_with_a_common_prefix_is_refused(roots: tuple[Path, Path]) -> None:
    """/x/allowed-evil is not inside /x/allowed (path components, not string prefixes)."""
    allowed, _ = roots
    evil = allowed.parent / "allowed-evil"
    evil.mkdir()
    with pytest.raises(CwdNotAllowed):
        resolve_cwd(str(evil), [allowed])


def test_symlink_inside_pointing_out_is_refused(roots: tuple[Path, Path]) -> None:
    """A symlink inside the root that points outside is judged by its target."""
    allowed, outside = roots
    link = allowed / "escape"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(CwdNotAllowed):
        resolve_cwd(str(link), [allowed])


def test_symlinked_root_allows_its_real_contents(roots: tuple[Path, Path], tmp_path: Path) -> None:
    """A root given through a symlink is resolved too, so its real subdirectories pass."""
    allowed, _ = roots
    root_link = tmp_path / "root-link"
    root_link.symlink_to(allowed, target_is_directory=True)
    assert resolve_cwd(str(allowed / "sub"), [root_link]) == (allowed / "sub").resolve()


@pytest.mark.parametrize(
    "cwd", ["missing", "relative/dir", "file"], ids=["nonexistent", "relative", "not-a-dir"]
)
def test_nonexistent_relative_or_file_cwd_is_refused(roots: tuple[Path, Path], cwd: str) -> None:
    """A missing directory, a relative path or a regular file is refused."""
    allowed, _ = roots
    (allowed / "file").write_text("x")
    path = cwd if cwd == "relative/dir" else str(allowed / cwd)
    with pytest.raises(CwdNotAllowed):
        resolve_cwd(path, [allowed])


def test_default_allowlist_is_home_only_and_env_takes_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The default root is the home directory only (no temp dir); the env takes a JSON list."""
    settings = AgentSettings(gateway_url="ws://127.0.0.1:1/x", credential="c")
    assert settings.cwd_allowlist == [Path.home()]
    monkeypatch.setenv("GT_AGENT_CWD_ALLOWLIST", f'["{tmp_path}", "/srv"]')
    settings = AgentSettings(gateway_url="ws://127.0.0.1:1/x", credential="c")
    assert settings.cwd_allowlist == [tmp_path, Path("/srv")]
    assert (settings.chunk_bytes, settings.max_output_bytes, settings.max_channels) == (
        32 * 1024,
        64 * 1024 * 1024,
        16,
    )


def test_relative_allowlist_entry_is_a_config_error() -> None:
    """An allowlist entry must be absolute (a relative one would depend on the agent's cwd)."""
    with pytest.raises(ValueError, match="absolute"):
        AgentSettings(gateway_url="ws://127.0.0.1:1/x", credential="c", cwd_allowlist=["rel"])


def test_output_budget_caps_delivery_and_counts_everything() -> None:
    """Past the cap output is dropped and flagged, but produced bytes keep counting."""
    budget = OutputBudget(10)
    assert budget.take(OutputStream.STDOUT, b"123456") == b"123456"
    assert budget.truncated is False
    assert budget.take(OutputStream.STDERR, b"abcdef") == b"abcd"
    assert budget.truncated is True
    assert budget.take(OutputStream.STDOUT, b"xyz") == b""
    assert budget.delivered_bytes == 10
    assert budget.produced == {OutputStream.STDOUT: 9, OutputStream.STDERR: 6}


def test_output_exactly_at_the_cap_is_not_truncated() -> None:
    """Filling the cap exactly is complete output, not truncation."""
    budget = OutputBudget(4)
    assert budget.take(OutputStream.STDOUT, b"1234") == b"1234"
    assert budget.truncated is False


@pytest.mark.parametrize(
    ("stop", "returncode", "expected"),
    [
        (None, 0, (ExitReason.EXITED, 0)),
        (None, 127, (ExitReason.EXITED, 127)),
        (None, -9, (ExitReason.EXITED, -9)),
        (ExitReason.TIMEOUT, -15, (ExitReason.TIMEOUT, -15)),
        (ExitReason.CANCELLED, -9, (ExitReason.CANCELLED, -9)),
        (ExitReason.SESSION_CLOSED, None, (ExitReason.SESSION_CLOSED, None)),
    ],
    ids=["ok", "shell-127", "signal", "timeout", "cancelled", "session-closed-unknown-code"],
)
def test_exit_reason_mapping(
    stop: ExitReason | None, returncode: int | None, expected: tuple[ExitReason, int | None]
) -> None:
    """A process ending by itself is `exited` with its code; a killed one names the kill."""
    assert exit_outcome(stop, returncode) == expected


def test_exited_is_not_a_kill_reason() -> None:
    """Asking for `exited` or `spawn_failed` as a kill reason is a programming error."""
    with pytest.raises(ValueError, match="not a reason to kill"):
        exit_outcome(ExitReason.SPAWN_FAILED, None)


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file"), "command not found: prog"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied: prog"),
        (OSError(errno.ENOEXEC, "Exec format error"), "not an executable: prog"),
        (
            OSError(errno.E2BIG, "Argument list too long"),
            "cannot start prog: Argument list too long",
        ),
    ],
    ids=["missing", "permission", "noexec", "other"],
)
def test_spawn_errors_get_short_reasons(exc: OSError, text: str) -> None:
    """Spawn failures become one short line naming the program, never a traceback."""
    assert spawn_error_text(exc, "prog") == text


def test_vanished_cwd_is_not_reported_as_command_not_found() -> None:
    """A FileNotFoundError naming the working directory says so, not "command not found"."""
    exc = FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/self/fd/7")
    text = spawn_error_text(exc, "prog", "/proc/self/fd/7")
    assert text == "working directory unavailable: No such file or directory"
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "prog")
    assert spawn_error_text(missing, "prog", "/proc/self/fd/7") == "command not found: prog"


def test_child_environment_drops_every_agent_variable() -> None:
    """GT_AGENT_* (any case) never reaches a child; everything else does."""
    base = {
        "PATH": "/bin",
        "GT_AGENT_CREDENTIAL": "secret",
        "gt_agent_credential_file": "/x",
        "GT_AGENT_CONFIG_FILE": "/c.toml",
        "GT_OTHER": "kept",
    }
    assert child_environment(base) == {"PATH": "/bin", "GT_OTHER": "kept"}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_component_swapped_for_a_symlink_after_the_check_is_refused(
    roots: tuple[Path, Path],
) -> None:
    """resolve_cwd passes, then the directory becomes a symlink out: open_dir refuses it."""
    allowed, outside = roots
    work = allowed / "sub"
    real = resolve_cwd(str(work), [allowed])
    work.rename(allowed / "sub-old")
    work.symlink_to(outside, target_is_directory=True)
    with pytest.raises(CwdNotAllowed):
        open_dir(real, [allowed])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_open_cwd_holds_the_directory_not_its_name(roots: tuple[Path, Path]) -> None:
    """The held fd keeps pointing at the checked directory after a rename and symlink swap."""
    allowed, outside = roots
    workdir = open_cwd(str(allowed / "sub"), [allowed])
    try:
        assert workdir.fd is not None
        (allowed / "sub").rename(allowed / "sub-old")
        (allowed / "sub").symlink_to(outside, target_is_directory=True)
        held = Path(os.readlink(workdir.spawn_cwd()))
        assert held == (allowed / "sub-old").resolve()
    finally:
        workdir.close()
    assert workdir.fd is None


def test_shell_is_started_through_setsid_ctty_without_python_in_the_child() -> None:
    """With util-linux setsid there is no preexec_fn; without it the fallback keeps one."""
    argv, options = shell_command("/bin/sh", "/usr/bin/setsid")
    assert argv == ["/usr/bin/setsid", "--ctty", "/bin/sh", "-i"]
    assert options == {}
    argv, options = shell_command("/bin/sh", None)
    assert argv == ["/bin/sh", "-i"]
    assert options["start_new_session"] is True and callable(options["preexec_fn"])


def test_command_goes_through_the_shell_and_argv_does_not() -> None:
    """`command` is wrapped in /bin/sh -c; `argv` is passed through untouched."""
    shell = Terminal(session_id="s", channel_id="c", command="echo $HOME; ls")
    direct = Terminal(session_id="s", channel_id="c", argv=["echo", "$HOME; ls"])
    assert platform_argv(shell) == ["/bin/sh", "-c", "echo $HOME; ls"]
    assert platform_argv(direct) == ["echo", "$HOME; ls"]
