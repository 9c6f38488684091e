"""bench/model_choice.py: candidates and abstention weights weighed on non-test rows, with held-out OOD shapes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bench import model_choice, trained
from training import artifact, conformal_report
from training.model import CLASSIFIER_WEIGHT_DECAY

TINY = ["--seed", "3", "--epochs", "2", "--hidden", "16"]


def test_other_frames_are_never_a_box_of_the_test_set():
    test_boxes = {image.tobytes() for image in conformal_report._boxes(5000, 0)}
    assert len(test_boxes) == 81  # every corner pair the test set can draw
    frames = model_choice.other_frames(2000, 1)
    assert frames.shape == (2000, 64) and set(np.unique(frames)) == {0.0, model_choice.PIXEL_MAX}
    assert not test_boxes & {image.tobytes() for image in frames}
    assert len({image.tobytes() for image in frames}) > 50  # many kinds, not one repeated frame


def test_candidates_are_weighed_on_validation_rows_and_shapes(tmp_path: Path):
    decay, _ = trained.train(tmp_path / "decay", "digits-seed-3", TINY)
    plain, _ = trained.train(tmp_path / "plain", "digits-seed-3", [*TINY, "--weight-decay", "0"])
    weight_decay = {v: artifact.read_metadata(v).training["model"]["weight_decay"] for v in (decay, plain)}
    assert weight_decay == {decay: CLASSIFIER_WEIGHT_DECAY, plain: 0.0}  # a classifier's default, and 0 when asked
    candidates = ["--candidate", f"decay={tmp_path / 'decay'}", "--candidate", f"plain={tmp_path / 'plain'}"]
    text = model_choice.main([*candidates, "--weights", "0", "3"])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    models = {r[0]: r for r in rows if len(r) == 4 and r[0] in ("decay", "plain")}
    assert models["decay"][2] == "+0.0000 [+0.0000, +0.0000]"  # the first candidate is the reference
    assert models["decay"][1] != models["plain"][1]  # weight decay trained another network
    weighed = {(r[0], r[1]): [float(v) for v in r[2:]] for r in rows if len(r) == 8 and r[1] in ("0", "3")}
    assert set(weighed) == {("decay", "0"), ("decay", "3"), ("plain", "0"), ("plain", "3")}
    for accepted, lowest, *abstained in weighed.values():
        assert 0.0 <= lowest <= accepted <= 1.0
        assert all(0.0 <= share <= 1.0 for share in abstained)
    assert re.search(r"\| noise \| inverted \| lines and crosses \| other frames \|", text)
