"""bench/conformal_choice.py: the score and delta candidates, weighed on calibration and validation rows only."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from bench import conformal_choice, trained


def test_candidates_are_weighed_on_calibration_and_validation_rows(tmp_path: Path):
    trained.train(tmp_path / "models", "digits-seed-3", ["--seed", "3", "--epochs", "2", "--hidden", "16"])
    text = conformal_choice.main(["--repository", str(tmp_path / "models"), "--out", str(tmp_path / "out")])
    assert len(list((tmp_path / "out").glob("conformal-choice-*.md"))) == 1
    assert "Seeds 3:" in text and "(144 in all)" in text  # the seed's validation rows, not its 180 test rows
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
    sizes = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            sizes[int(cells[0])] = [float(c) for c in cells[1:]]
    assert sorted(sizes) == [288, 378, 468, 558] and [sizes[n][0] for n in sorted(sizes)] == [360, 270, 180, 90]
    assert all(0.0 <= v[1] <= 1.0 and v[2] <= v[1] for v in sizes.values())  # accepted share, lowest seed below mean


def test_floor_risk_is_the_chance_some_seed_covers_less_than_the_floor():
    rng = np.random.default_rng(0)
    for calibration, test in ((288, 360), (468, 180)):
        r = math.ceil((calibration + 1) * 0.9)
        coverage = rng.beta(r, calibration + 1 - r, 200_000)  # the set's coverage given each calibration draw
        one = np.mean(rng.binomial(test, coverage) / test < conformal_choice.FLOOR)
        assert conformal_choice.floor_risk(calibration, test) == pytest.approx(1 - (1 - one) ** 20, abs=0.02)
    assert conformal_choice.floor_risk(468, 180) > conformal_choice.floor_risk(288, 360)  # fewer test rows: noisier
