"""The OpenAPI document against the running server: schemathesis generates requests from it, all checks on.

Bounded here (about 300 cases, a few minutes); ``bench/schemathesis_run.sh`` runs the long version.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import Server

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tiny_classifier_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract") / "models"
    shutil.copytree(tiny_classifier_dir, root / "tiny" / "1")
    server = Server(root, max_samples=200, max_mc_rows=2000)
    yield server
    server.stop()


def test_generated_requests_meet_the_openapi_contract(server, tmp_path):
    command = [str(SCHEMATHESIS), "--config-file", str(ROOT / "schemathesis.toml"), "run", f"{server.url}/openapi.json"]
    command += ["--checks", "all", "--max-examples", "50"]
    command += ["--seed", "1", "--workers", "1", "--request-timeout", "30", "--suppress-health-check", "all"]
    command += ["--exclude-path-regex", "/unload$"]  # it would unload the model under every later case
    command += ["--report", "junit", "--report-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-8000:]
    assert httpx.get(f"{server.url}/health/live").status_code == 200
    log = Path(server.log.name).read_text()
    assert "Traceback" not in log and " 500 " not in log
