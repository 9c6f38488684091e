"""bench/conformal_choice.py: the score and delta candidates, weighed on calibration and validation rows only."""

from __future__ import annotations

import re
from pathlib import Path

from bench import conformal_choice, trained


def test_candidates_are_weighed_on_calibration_and_validation_rows(tmp_path: Path):
    trained.train(tmp_path / "models", "digits-seed-3", ["--seed", "3", "--epochs", "2", "--hidden", "16"])
    text = conformal_choice.main(["--repository", str(tmp_path / "models"), "--out", str(tmp_path / "out")])
    assert len(list((tmp_path / "out").glob("conformal-choice-*.md"))) == 1
    assert "Seeds 3:" in text and "(144 in all)" in text  # the seed's validation rows, not its 360 test rows
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for score in ("aps-randomized", "lac", "raps"):
        coverage = [float(v) for v in re.findall(r"\d\.\d{3}", rows[score])[:2]]
        assert all(0.7 < c <= 1.0 for c in coverage), rows[score]  # calibrated sets cover near 0.9
    accepted = {}
    for line in text.splitlines():
        if line.startswith("| mc: 1 - probability + mutual information |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            accepted[float(cells[1])] = float(cells[2])
    assert set(accepted) == {0.1, 0.2} and accepted[0.2] >= accepted[0.1]  # a looser delta never accepts fewer
