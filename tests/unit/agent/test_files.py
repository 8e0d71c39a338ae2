"""Unit tests of the file channel's path policy, partial-file naming and limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gurutunnel_agent.channels.files import (
    FileLimits,
    FileTransferError,
    partial_name,
    resolve_file_path,
)
from gurutunnel_protocol import ErrorCode


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed root holding ``sub/file.txt``, and a directory outside it holding a file."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "file.txt").write_bytes(b"inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"outside")
    return allowed, outside


def _code(path: str, allowlist: list[Path], *, for_write: bool) -> ErrorCode:
    with pytest.raises(FileTransferError) as info:
        resolve_file_path(path, allowlist, for_write=for_write)
    return info.value.code


def test_file_inside_allowlist_resolves_to_its_real_path(roots: tuple[Path, Path]) -> None:
    """A regular file under an allowed root resolves (read) to its real path."""
    allowed, _ = roots
    path = allowed / "sub" / "file.txt"
    assert resolve_file_path(str(path), [allowed], for_write=False) == path.resolve()


def test_new_file_inside_allowlist_is_allowed_for_write(roots: tuple[Path, Path]) -> None:
    """A file that does not exist yet may be written in an allowed directory."""
    allowed, _ = roots
    path = allowed / "new.bin"
    assert resolve_file_path(str(path), [allowed], for_write=True) == path.resolve()


def test_file_outside_allowlist_is_refused(roots: tuple[Path, Path]) -> None:
    """A path outside every root is path_not_allowed, for reading and for writing."""
    allowed, outside = roots
    path = str(outside / "secret.txt")
    assert _code(path, [allowed], for_write=False) == ErrorCode.PATH_NOT_ALLOWED
    assert _code(path, [allowed], for_write=True) == ErrorCode.PATH_NOT_ALLOWED


def test_dotdot_component_is_refused_even_when_it_stays_inside(roots: tuple[Path, Path]) -> None:
    """Any ``..`` component is refused outright, whether or not it would escape."""
    allowed, _ = roots
    staying = f"{allowed}/sub/../sub/file.txt"
    escaping = f"{allowed}/../outside/secret.txt"
    assert _code(staying, [allowed], for_write=False) == ErrorCode.PATH_NOT_ALLOWED
    assert _code(escaping, [allowed], for_write=True) == ErrorCode.PATH_NOT_ALLOWED


def test_relative_path_is_refused(roots: tuple[Path, Path]) -> None:
    """A relative path is path_not_allowed (it would depend on the agent's cwd)."""
    allowed, _ = roots
    assert _code("sub/file.txt", [allowed], for_write=False) == ErrorCode.PATH_NOT_ALLOWED


def test_symlinked_parent_leading_out_is_refused(roots: tuple[Path, Path]) -> None:
    """A directory symlink inside the root that points outside cannot be used to escape."""
    allowed, outside = roots
    (allowed / "door").symlink_to(outside, target_is_directory=True)
    read = str(allowed / "door" / "secret.txt")
    write = str(allowed / "door" / "dropped.bin")
    assert _code(read, [allowed], for_write=False) == ErrorCode.PATH_NOT_ALLOWED
    assert _code(write, [allowed], for_write=True) == ErrorCode.PATH_NOT_ALLOWED


def test_symlinked_parent_staying_inside_is_allowed(roots: tuple[Path, Path]) -> None:
    """A directory symlink that stays inside the root resolves to the real directory."""
    allowed, _ = roots
    (allowed / "alias").symlink_to(allowed / "sub", target_is_directory=True)
    got = resolve_file_path(str(allowed / "alias" / "file.txt"), [allowed], for_write=False)
    assert got == (allowed / "sub" / "file.txt").resolve()


def test_symlink_as_final_component_is_refused(roots: tuple[Path, Path]) -> None:
    """A final component that is a symlink is refused, even if it points inside the root."""
    allowed, outside = roots
    (allowed / "out.txt").symlink_to(outside / "secret.txt")
    (allowed / "in.txt").symlink_to(allowed / "sub" / "file.txt")
    for name in ("out.txt", "in.txt"):
        path = str(allowed / name)
        assert _code(path, [allowed], for_write=False) == ErrorCode.PATH_NOT_ALLOWED
        assert _code(path, [allowed], for_write=True) == ErrorCode.PATH_NOT_ALLOWED


def test_dangling_symlink_as_upload_target_is_refused(roots: tuple[Path, Path]) -> None:
    """A dangling symlink cannot be used to create a file where it points."""
    allowed, outside = roots
    (allowed / "trap").symlink_to(outside / "created-by-upload")
    assert _code(str(allowed / "trap"), [allowed], for_write=True) == ErrorCode.PATH_NOT_ALLOWED
    assert not (outside / "created-by-upload").exists()


def test_nul_byte_is_refused(roots: tuple[Path, Path]) -> None:
    """A NUL character is path_not_allowed (it would truncate the path in the OS)."""
    allowed, _ = roots
    assert _code(f"{allowed}/sub/file.txt\x00x", [allowed], for_write=False) == (
        ErrorCode.PATH_NOT_ALLOWED
    )


def test_missing_parent_inside_allowlist_is_file_not_found(roots: tuple[Path, Path]) -> None:
    """A missing directory inside the allowlist is file_not_found; outside it stays refused."""
    allowed, outside = roots
    inside = str(allowed / "nope" / "x.bin")
    beyond = str(outside / "nope" / "x.bin")
    assert _code(inside, [allowed], for_write=True) == ErrorCode.FILE_NOT_FOUND
    assert _code(beyond, [allowed], for_write=True) == ErrorCode.PATH_NOT_ALLOWED


def test_missing_file_to_read_is_file_not_found(roots: tuple[Path, Path]) -> None:
    """Downloading a file that does not exist is file_not_found."""
    allowed, _ = roots
    assert _code(str(allowed / "absent"), [allowed], for_write=False) == ErrorCode.FILE_NOT_FOUND


def test_directory_as_download_target_is_refused(roots: tuple[Path, Path]) -> None:
    """A directory is not a regular file: path_not_allowed for read and write."""
    allowed, _ = roots
    assert _code(str(allowed / "sub"), [allowed], for_write=False) == ErrorCode.PATH_NOT_ALLOWED
    assert _code(str(allowed / "sub"), [allowed], for_write=True) == ErrorCode.PATH_NOT_ALLOWED


def test_path_that_does_not_name_a_file_is_refused(roots: tuple[Path, Path]) -> None:
    """A trailing separator, a trailing ``.`` or the root itself are refused."""
    allowed, _ = roots
    for path in (f"{allowed}/sub/", f"{allowed}/sub/.", "/"):
        assert _code(path, [allowed], for_write=True) == ErrorCode.PATH_NOT_ALLOWED


def test_allowlist_root_itself_cannot_be_read_as_a_file(roots: tuple[Path, Path]) -> None:
    """The root names a directory whose parent is outside: path_not_allowed."""
    allowed, _ = roots
    assert _code(str(allowed), [allowed], for_write=False) == ErrorCode.PATH_NOT_ALLOWED


def test_empty_allowlist_refuses_everything(roots: tuple[Path, Path]) -> None:
    """With no root configured, no path is allowed."""
    allowed, _ = roots
    assert _code(str(allowed / "sub" / "file.txt"), [], for_write=False) == (
        ErrorCode.PATH_NOT_ALLOWED
    )


def test_fifo_is_not_a_regular_file(roots: tuple[Path, Path]) -> None:
    """A FIFO (which would block an open) is refused before it is opened."""
    allowed, _ = roots
    fifo = allowed / "pipe"
    os.mkfifo(fifo)
    assert _code(str(fifo), [allowed], for_write=False) == ErrorCode.PATH_NOT_ALLOWED


def test_partial_name_is_hidden_and_keyed_by_content() -> None:
    """The partial file is a dot file named after the target and the content's digest."""
    digest = "ab" * 32
    assert partial_name("report.pdf", digest) == ".report.pdf.gtpart-abababababababab"
    assert partial_name("report.pdf", "cd" * 32) != partial_name("report.pdf", digest)


def test_limits_refuse_a_chunk_that_cannot_fit_a_frame() -> None:
    """chunk_bytes above 512 KiB, or a window smaller than a chunk, is a configuration error."""
    with pytest.raises(ValueError, match="chunk_bytes"):
        FileLimits(chunk_bytes=1024 * 1024)
    with pytest.raises(ValueError, match="window_bytes"):
        FileLimits(chunk_bytes=4096, window_bytes=1024)
    assert FileLimits().chunk_bytes == 256 * 1024
