"""What pyproject.toml promises: the server runs on its own dependencies, without training's
(scikit-learn, SciPy, matplotlib: the ``[train]`` extra), and every package the code imports is
declared where the code that imports it is installed."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TRAINING_ONLY = ("scipy", "sklearn", "matplotlib")

SERVE_WITHOUT_TRAINING = f"""
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {TRAINING_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Absent())
from fastapi.testclient import TestClient
from app.main import create_app
from app.schemas import DIGIT_ZERO
from app.settings import Settings

with TestClient(create_app(Settings(model_dir=sys.argv[1], poll_seconds=0))) as client:
    plain = client.post("/predict", json={{"instances": [DIGIT_ZERO]}})
    mc = client.post("/predict/mc-dropout", json={{"instances": [DIGIT_ZERO], "samples": 20, "seed": 1}})
    assert plain.status_code == 200 and mc.status_code == 200, (plain.text, mc.text)
    assert mc.json()["predictions"][0]["mutual_information"] >= 0
    assert client.get("/docs").status_code == 200
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({TRAINING_ONLY!r}))
assert not loaded, loaded
print("served without", {TRAINING_ONLY!r})
"""


def test_the_server_answers_without_trainings_packages(tiny_classifier_dir):
    """Both signatures run (predict and MC dropout) while importing scikit-learn, SciPy or
    matplotlib fails, as in the runtime image, which has none of them."""
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_TRAINING, str(tiny_classifier_dir.parents[1])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served without" in result.stdout


def imported(folder: str) -> set[str]:
    """Top-level names of third-party modules imported anywhere under ``folder``."""
    names: set[str] = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("app", "training", "__future__")}


def declared(requirements: list[str]) -> set[str]:
    return {
        re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-") for requirement in requirements
    }


def distributions(module: str) -> set[str]:
    found = importlib.metadata.packages_distributions().get(module, [])
    assert found, f"{module} is imported but installed by no distribution"
    return {name.lower().replace("_", "-") for name in found}


def covered(module: str, requirements: set[str]) -> bool:
    # tensorflow comes as tensorflow-cpu on Linux x86_64 and as tensorflow elsewhere.
    return bool(distributions(module) & requirements) or (module == "tensorflow" and "tensorflow" in requirements)


def test_every_import_is_declared_where_it_is_needed():
    runtime = declared(PROJECT["dependencies"])
    train = runtime | declared(PROJECT["optional-dependencies"]["train"])
    assert {"scikit-learn", "scipy", "matplotlib"}.isdisjoint(runtime), "training's packages are not the server's"
    assert not [m for m in imported("app") if not covered(m, runtime)]
    assert not [m for m in imported("training") if not covered(m, train)]
    assert "dropout-serve[train]" in PROJECT["optional-dependencies"]["dev"]
    assert PROJECT["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()
