"""File transfer checks that need no bus: paths, upload headers, Range, error mapping, roles."""

from __future__ import annotations

import pytest

from gurutunnel_api.auth.models import (
    Role,
    Technician,
    may_download,
    may_upload,
    permissions_for_role,
)
from gurutunnel_api.errors import ApiError, file_refusal
from gurutunnel_api.files.service import check_path, range_start, upload_spec
from gurutunnel_protocol import ErrorCode

SHA = "ab" * 32


@pytest.mark.parametrize(
    "path",
    ["", "relative", "./x", "/a/../b", "/a/./b", "/a/..", "/a\\..\\b", "/a\x00b", "/" + "x" * 5000],
)
def test_bad_paths_are_refused_with_path_not_allowed(path: str) -> None:
    """Empty, relative, '.'/'..' components (either separator), NUL, too long: 422."""
    with pytest.raises(ApiError) as caught:
        check_path(path)
    assert (caught.value.status, caught.value.code) == (422, ErrorCode.PATH_NOT_ALLOWED)


@pytest.mark.parametrize("path", ["/srv/a.bin", "/srv/..hidden", "/a/b./c", "C:\\data\\x.txt"])
def test_absolute_paths_without_dot_components_pass(path: str) -> None:
    """Names that merely contain dots are fine; the agent judges the allowlist."""
    assert check_path(path) == path


def test_upload_headers_give_the_whole_file_or_the_rest_from_start() -> None:
    """Without Content-Range the body is the file; with it, the rest from its start."""
    whole = upload_spec(
        path="/a", overwrite=False, content_length="10", sha256=SHA, content_range=None
    )
    assert (whole.size, whole.start, whole.length) == (10, 0, 10)
    rest = upload_spec(
        path="/a", overwrite=True, content_length="4", sha256=SHA, content_range="bytes 6-9/10"
    )
    assert (rest.size, rest.start, rest.length, rest.overwrite) == (10, 6, 4, True)


@pytest.mark.parametrize(
    ("length", "sha", "content_range", "status"),
    [
        (None, SHA, None, 411),
        ("10", None, None, 422),
        ("10", SHA.upper(), None, 422),
        ("4", SHA, "bytes 6-8/10", 422),
        ("5", SHA, "bytes 6-9/10", 422),
        ("4", SHA, "bytes=6-9/10", 422),
        ("4", SHA, "bytes 9-6/10", 422),
    ],
)
def test_bad_upload_headers_are_411_or_422_validation_error(
    length: str | None, sha: str | None, content_range: str | None, status: int
) -> None:
    """Missing length 411; bad digest, or a range that is not the rest of the file: 422."""
    with pytest.raises(ApiError) as caught:
        upload_spec(
            path="/a",
            overwrite=False,
            content_length=length,
            sha256=sha,
            content_range=content_range,
        )
    assert (caught.value.status, caught.value.code) == (status, ErrorCode.VALIDATION_ERROR)


def test_only_open_ended_byte_ranges_are_served() -> None:
    """bytes=N- gives N; no header or other forms are ignored (the whole file)."""
    assert range_start("bytes=100-") == 100
    assert range_start(None) is None
    assert range_start("bytes=0-10") is None
    assert range_start("bytes=1-,5-") is None
    assert range_start("items=1-") is None


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.PATH_NOT_ALLOWED, 403),
        (ErrorCode.FILE_NOT_FOUND, 404),
        (ErrorCode.FILE_EXISTS, 409),
        (ErrorCode.FILE_TOO_LARGE, 413),
        (ErrorCode.HASH_MISMATCH, 422),
        (ErrorCode.IO_ERROR, 502),
        (ErrorCode.AGENT_TIMEOUT, 504),
        (ErrorCode.TOO_MANY_CHANNELS, 429),
    ],
)
def test_agent_file_codes_map_to_the_contract_statuses(code: ErrorCode, status: int) -> None:
    """Each refusal keeps its code and gets the contract's status."""
    error = file_refusal(code, "why")
    assert (error.status, error.code) == (status, code)


def test_unknown_agent_code_is_502_agent_error() -> None:
    """A code with no meaning for a transfer (a protocol bug) is 502 agent_error."""
    error = file_refusal(ErrorCode.MALFORMED_FRAME, "gap")
    assert (error.status, error.code) == (502, ErrorCode.AGENT_ERROR)


def test_roles_decide_file_permissions_whatever_the_columns_say() -> None:
    """Admins both, viewers neither, techs as stored (defaults: download only)."""
    assert permissions_for_role(Role.TECH, can_upload=None, can_download=None) == (False, True)
    assert permissions_for_role(Role.ADMIN, can_upload=False, can_download=False) == (True, True)
    assert permissions_for_role(Role.VIEWER, can_upload=True, can_download=True) == (False, False)
    viewer = Technician(id="v", username="v", password_hash="x", role="viewer", can_upload=True)
    admin = Technician(id="a", username="a", password_hash="x", role="admin", can_download=False)
    assert not may_upload(viewer) and not may_download(viewer)
    assert may_upload(admin) and may_download(admin)
