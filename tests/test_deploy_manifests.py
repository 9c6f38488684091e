"""The Kubernetes and KServe manifests under deploy/: they render, they are schema-valid, and
they agree with the code (probe paths are real routes, env names are real settings, ports match).

Rendering: tests/manifests.py. Core resources are validated strictly (unknown fields rejected)
by kubernetes-validate; KServe resources by the openAPIV3Schema of KServe's own CRDs, read from
../shared/kserve-crds/ beside the repository.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from manifests import KSERVE, KSERVE_GRPC, KUBERNETES, OVERLAYS, ROOT, environment, is_route, one, render
from pydantic import AliasChoices

from app.cli import parser
from app.main import create_app
from app.server import GRACEFUL_SHUTDOWN_SECONDS
from app.settings import Settings

KSERVE_CRDS = Path(os.environ.get("DS_SHARED_DIR", ROOT / ".." / "shared")) / "kserve-crds"  # as tests/container
# The oldest Kubernetes minor still maintained upstream when this was written, and the newest
# that kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.32.0", kubernetes_validate.latest_version()]
# Environment variables that are not settings: Keras and matplotlib put caches under $HOME, which
# must be the writable /tmp when the root filesystem is read-only.
OTHER_ENV = {"HOME"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(KUBERNETES / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def kserve() -> list[dict]:
    return render(KSERVE)


@pytest.fixture(scope="module")
def kserve_grpc() -> list[dict]:
    return render(KSERVE_GRPC)


# --- rendering and schemas ------------------------------------------------------------------


def test_there_are_overlays_for_dev_and_production():
    assert {"dev", "production"} <= set(OVERLAYS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_overlays_are_strictly_valid(rendered, version):
    for overlay, resources in rendered.items():
        kinds = {r["kind"] for r in resources}
        core = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "NetworkPolicy"}
        assert core <= kinds
        for resource in resources:
            if resource["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # the Prometheus Operator's kinds: tests/test_deploy_monitoring.py
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


def test_kserve_resources_match_kserves_crds(kserve, kserve_grpc):
    assert {r["kind"] for r in kserve} == {r["kind"] for r in kserve_grpc} == {"ServingRuntime", "InferenceService"}
    for resource in kserve + kserve_grpc:
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
    assert "v2" in runtime["spec"]["protocolVersions"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2"
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats


# --- agreement with the code ----------------------------------------------------------------


def pods(resources: list[dict]) -> list[tuple[dict, dict]]:
    """(pod template metadata, pod spec) of the Deployment or the ServingRuntime."""
    deployment = [r for r in resources if r["kind"] == "Deployment"]
    runtime = [r for r in resources if r["kind"] == "ServingRuntime"]
    if deployment:
        template = deployment[0]["spec"]["template"]
        return [(template["metadata"], template["spec"])]
    return [({"annotations": runtime[0]["spec"]["annotations"]}, runtime[0]["spec"])]


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

    def setting(name: str) -> int:
        return int(env.get(f"DROPOUT_SERVE_{name.upper()}") or Settings.model_fields[name].default)

    listening = container["ports"][0]["containerPort"]  # HTTP first: Knative and KServe route the first port
    assert setting("port") == listening, where
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert named.get("grpc", setting("grpc_port")) == setting("grpc_port"), f"{where}: the gRPC port"
    assert setting("grpc_port") not in (0, listening), f"{where}: gRPC is on, on a port of its own"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert port_number(container[probe]["httpGet"]["port"], container) == listening, f"{where}: {probe}"
    annotations = metadata["annotations"]
    port = annotations.get("prometheus.io/port") or annotations.get("prometheus.kserve.io/port")
    assert int(port) == listening, f"{where}: the Prometheus port"
    for service in [r for r in resources if r["kind"] == "Service"]:
        targets = {p["name"]: port_number(p["targetPort"], container) for p in service["spec"]["ports"]}
        assert targets == {"http": listening, "grpc": setting("grpc_port")}, where
        protocols = {p["name"]: p.get("appProtocol") for p in service["spec"]["ports"]}
        assert protocols["grpc"] == "grpc", f"{where}: gRPC is HTTP/2; meshes balance it per request when told"


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
    """KServe sends Open Inference Protocol requests to a runtime that declares v2 (REST) and
    grpc-v2 (gRPC, which the runtime turns on with DROPOUT_SERVE_GRPC_PORT)."""
    runtime = one(kserve, "ServingRuntime")
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    (container,) = runtime["spec"]["containers"]
    assert int(environment(container, kserve)["DROPOUT_SERVE_GRPC_PORT"]) > 0
    assert is_route("/v2/health/ready") and is_route("/v2/models/digits")
    assert is_route("/v2/models/digits/infer", "POST")


def test_kserve_aggregates_our_metrics_with_the_queue_proxys(kserve):
    """Scraping alone would reach the queue-proxy's metrics only, not the dropout_serve_* series."""
    annotations = one(kserve, "ServingRuntime")["spec"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations["serving.kserve.io/enable-metric-aggregation"] == "true"
    assert is_route(annotations["prometheus.kserve.io/path"])


def test_the_default_model_is_the_inference_services_name(kserve):
    """KServe fills {{.Name}} into the runtime's container; our flags then name the default model."""
    runtime, service = one(kserve, "ServingRuntime"), one(kserve, "InferenceService")
    (container,) = runtime["spec"]["containers"]
    cmd = json.loads((ROOT / "Dockerfile").read_text().split("\nCMD ", 1)[1].splitlines()[0])
    assert container["command"] == cmd, "the image's own command, so the flags go to python -m app"
    name = service["metadata"]["name"]
    flags = parser().parse_args([arg.replace("{{.Name}}", name) for arg in container["args"]])
    assert name == flags.DROPOUT_SERVE_DEFAULT_MODEL


def test_a_mounted_claim_is_polled_so_replicas_serve_one_version(kserve):
    """A pvc:// storage URI is mounted, not copied: without polling, pods started before a publish
    would keep the old version while later ones load the new one."""
    runtime, service = one(kserve, "ServingRuntime"), one(kserve, "InferenceService")
    assert service["spec"]["predictor"]["model"]["storageUri"].startswith("pvc://")
    (container,) = runtime["spec"]["containers"]
    assert float(environment(container, kserve)["DROPOUT_SERVE_POLL_SECONDS"]) > 0


def test_the_grpc_variant_serves_the_same_model_on_the_runtimes_grpc_port(kserve, kserve_grpc):
    runtime, service = one(kserve_grpc, "ServingRuntime"), one(kserve_grpc, "InferenceService")
    assert service["metadata"]["name"] == one(kserve, "InferenceService")["metadata"]["name"]
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2" and "grpc-v2" in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    (port,) = model["ports"]  # Knative's and KServe's name for a gRPC port
    assert (port["name"], port["containerPort"]) == (
        "h2c",
        int(environment(container, kserve_grpc)["DROPOUT_SERVE_GRPC_PORT"]),
    )
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


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
