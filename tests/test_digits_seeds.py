"""bench/digits_seeds.py: trains one model per seed, scores each against issue 12's digits bar, counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import digits_seeds

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "bench/digits_seeds.py", "--seeds", "0", "1", "--samples", "10"]
    command += ["--repository", str(tmp_path / "models"), "--out", str(tmp_path / "out")]
    command += ["--", "--epochs", "2", "--hidden", "16"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_seeds_are_trained_scored_and_counted(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (record_file,) = (tmp_path / "out").glob("digits-seeds-*.json")
    record = json.loads(record_file.read_text())
    assert record["training_args"] == ["--epochs", "2", "--hidden", "16"]
    by_seed = record["results"]["0"]
    assert set(by_seed) == {"0", "1"}
    for seed, verdict in by_seed.items():
        assert (tmp_path / "models" / f"digits-seed-{seed}" / "1" / "metadata.json").is_file()
        report = json.loads((tmp_path / "models" / "reports" / f"seed-{seed}-eval-0" / "report.json").read_text())
        mc, reference = report["scores"]["mc"], report["scores"]["deterministic (uncalibrated)"]
        assert verdict["ece"] == [mc["ece"], reference["ece"]] and verdict["nll"] == [mc["nll"], reference["nll"]]
        assert verdict["ece_met"] == (mc["ece"] < reference["ece"])
        assert verdict["ece_floor"] == [mc["ece_floor"], reference["ece_floor"]]
        above = (mc["ece"] - mc["ece_floor"], reference["ece"] - reference["ece_floor"])
        assert verdict["ece_above_floor_lower"] == (above[0] < above[1])
    summary = record["summary"]["0"]
    assert summary["seeds"] == 2 and summary["ece_met"] == sum(v["ece_met"] for v in by_seed.values())
    pooled = summary["pooled"]
    assert pooled["rows"] == 360  # both seeds' 180 test rows
    assert set(pooled["by_prediction"]) == {"mc", "mc_uncalibrated", "deterministic", "deterministic_uncalibrated"}
    assert pooled["by_prediction"]["mc"]["ece"] == pytest.approx(pooled["ece"]["mc"])
    for name in ("nll", "ece"):
        assert pooled[name]["difference"] == pytest.approx(pooled[name]["mc"] - pooled[name]["reference"])
        assert pooled[name]["low"] <= pooled[name]["high"]
    assert "## Evaluation seed 0" in result.stdout and "All seeds' test rows as one set (360 rows)" in result.stdout

    again = run(tmp_path)  # trained models are reused, not trained again
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "models" / "digits-seed-0").iterdir()) == ["1"]


def test_summary_counts_bars_over_all_seeds_and_per_block_of_five():
    def verdict(ece_met: bool) -> dict:
        scores = {"nll": [0.05, 0.07], "ece": [0.01, 0.02], "ece_floor": [0.012, 0.008]}
        return {**scores, "nll_met": True, "ece_met": ece_met, "ood_met": True, "ece_above_floor_lower": True}

    met = [True, False, True, True, True, False, False, True, True, True, True]
    results = {0: {seed: verdict(m) for seed, m in enumerate(met)}}
    summary = digits_seeds.summary(results, list(range(11)))[0]
    assert summary["seeds"] == 11 and summary["ece_met"] == 8 and summary["nll_met"] == 11
    assert summary["ece_met_per_block_of_five"] == [4, 3]  # the 11th seed is in no full block
    assert summary["ece_above_floor_lower"] == 11
    assert summary["mean_ece"] == pytest.approx([0.01, 0.02])
