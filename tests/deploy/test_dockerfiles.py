"""``deploy/docker``: multi-stage images that run the services' own console scripts as non-root.

Parsed without Docker (the suite must not need a daemon): each Dockerfile has a build stage
that makes wheels of the project's own distributions and a final stage that copies only the
installed environment from it, with pinned base images, a numeric non-root USER, a health check
(or an explicit, documented NONE for the agent), no build tools, and the console script of the
distribution's pyproject.toml as its entrypoint. ``.dockerignore`` lets in exactly what the
builds copy.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.support import DOCKERFILES, ROOT

DISTRIBUTIONS = {
    "api": ROOT / "services" / "api",
    "gateway": ROOT / "services" / "gateway",
    "agent": ROOT / "agent",
}
PROTOCOL = ROOT / "libs" / "protocol"
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential|clang|cargo|rustc|git)\b")
PINNED = re.compile(r"^[a-z0-9./_-]+:(\d+\.\d+(\.\d+)?)[A-Za-z0-9._-]*(@sha256:[0-9a-f]{64})?$")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"{path.name}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def _service(path: Path) -> str:
    return path.name.removesuffix(".Dockerfile")


def test_every_service_has_a_dockerfile() -> None:
    """api, gateway and agent each have deploy/docker/<name>.Dockerfile, nothing else."""
    assert {_service(p) for p in DOCKERFILES} == set(DISTRIBUTIONS)


@pytest.fixture(params=DOCKERFILES, ids=_service)
def dockerfile(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_images_are_multi_stage_from_pinned_bases(dockerfile: Path) -> None:
    """A build stage and a final stage; every external base image pinned to a version."""
    stages = parse(dockerfile)
    assert len(stages) >= 2
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue
        assert PINNED.match(stage.base), f"{stage.base} is not pinned to a version"


def test_build_stage_makes_wheels_of_the_projects_distributions(dockerfile: Path) -> None:
    """The builder copies libs/protocol and the service, builds their wheels and installs the
    service from those wheels alone."""
    build = parse(dockerfile)[0]
    service_dir = DISTRIBUTIONS[_service(dockerfile)].relative_to(ROOT).as_posix()
    copied = {args.split()[0].rstrip("/") for args in build.all("COPY")}
    assert copied == {PROTOCOL.relative_to(ROOT).as_posix(), service_dir}
    runs = " ".join(build.all("RUN"))
    assert f"pip wheel --wheel-dir /wheels ./libs/protocol ./{service_dir}" in runs
    project = tomllib.loads((DISTRIBUTIONS[_service(dockerfile)] / "pyproject.toml").read_text())
    assert f"--no-index --find-links /wheels {project['project']['name']}" in runs


def test_final_stage_runs_as_non_root_without_build_tools(dockerfile: Path) -> None:
    """The final stage takes only the built environment, drops pip, installs no compiler and
    switches to a numeric non-root user."""
    final = parse(dockerfile)[-1]
    copies = final.all("COPY")
    assert copies and all(c.startswith("--from=build ") for c in copies), copies
    runs = " ".join(final.all("RUN"))
    assert "apt-get" not in runs and not BUILD_TOOLS.search(runs)
    assert "pip uninstall --yes pip" in runs
    users = final.all("USER")
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_entrypoint_is_the_services_console_script(dockerfile: Path) -> None:
    """ENTRYPOINT is the console script the distribution's pyproject.toml declares."""
    project = tomllib.loads((DISTRIBUTIONS[_service(dockerfile)] / "pyproject.toml").read_text())
    scripts = set(project["project"]["scripts"])
    entrypoint = json.loads(parse(dockerfile)[-1].all("ENTRYPOINT")[-1])
    assert entrypoint[0] in scripts, (entrypoint, scripts)


def test_health_is_checked_or_documented_as_absent(dockerfile: Path) -> None:
    """The API and the gateway check /healthz on their port; the agent (no port) says NONE."""
    final = parse(dockerfile)[-1]
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1
    service = _service(dockerfile)
    if service == "agent":
        assert checks[0] == "NONE"
        return
    prefix = {"api": "GT_API_", "gateway": "GT_GATEWAY_"}[service]
    assert "/healthz" in checks[0] and f"{prefix}PORT" in checks[0]
    exposed = final.all("EXPOSE")
    env = " ".join(final.all("ENV"))
    assert exposed and f"{prefix}PORT={exposed[0]}" in env
    assert f"{prefix}HOST=0.0.0.0" in env


def test_dockerignore_lets_in_exactly_what_the_builds_copy() -> None:
    """The context starts empty (`*`) and re-admits only the sources the builds COPY."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for path in DOCKERFILES:
        for args in parse(path)[0].all("COPY"):
            copied.add(args.split()[0].rstrip("/"))
    assert admitted == copied
    for pattern in ("**/.env", "**/*.pem", "**/*.credential", "**/.gurutunnel"):
        assert pattern in lines
