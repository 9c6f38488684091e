"""One model per name in a benchmark's repository: trained by ``python -m training`` unless already there."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from training import artifact

ROOT = Path(__file__).resolve().parents[1]


def train(repository: Path, name: str, arguments: list[str]) -> tuple[Path, float]:
    """The model's latest version folder and the training's wall time (0-ish when it was reused).

    Runs ``python -m training --artifacts repository --name name --if-missing *arguments`` in a fresh
    interpreter, as a user would, so reruns of a benchmark reuse what an earlier run trained.
    """
    command = [sys.executable, "-m", "training", "--artifacts", str(repository), "--name", name, "--if-missing"]
    started = time.monotonic()
    result = subprocess.run([*command, *arguments], cwd=ROOT, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{name}: training failed\n{result.stderr[-3000:]}")
    return repository / name / str(artifact.versions(repository / name)[-1]), seconds
