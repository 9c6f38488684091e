"""bench/outliers_tabular.py: one tiny model per weight, scored, and a complete table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import outliers_tabular

ROOT = Path(__file__).resolve().parents[1]


def test_one_seed_per_weight_makes_a_complete_table(tmp_path):
    command = [sys.executable, "bench/outliers_tabular.py", "--datasets", "wine", "--seeds", "0", "--samples", "10"]
    command += ["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    command += ["--", "--epochs", "2", "--hidden", "8"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    (record_file,) = (tmp_path / "out").glob("outliers-tabular-*.json")
    record = json.loads(record_file.read_text())
    assert record["training_args"] == ["--epochs", "2", "--hidden", "8"]
    for weight in ("0.5", "0"):
        scores = record["results"]["wine"][weight]["0"]
        assert set(scores) == set(outliers_tabular.METRICS)
        assert all(0.0 <= scores[k] <= 1.0 for k in scores if k != "nll_mc" and k != "nll_det")
        name = f"wine-w{weight}-s0"
        metadata = json.loads((tmp_path / "work" / "models" / name / "1" / "metadata.json").read_text())
        assert metadata["training"]["fit"]["outlier_weight"] == float(weight)
        assert scores["nll_mc"] == metadata["metrics"]["test_mc"]["nll"]
        assert (tmp_path / "work" / "reports" / name / "report.json").is_file()
    wins = record["summary"]["wine"]["wins"]
    assert all(sum(counts.values()) == 1 for counts in wins.values())

    table = (tmp_path / "out" / record_file.name.replace(".json", ".md")).read_text()
    assert table in result.stdout
    rows = [line for line in table.splitlines() if line.startswith("| wine")]
    # two weights in the means table, one row per metric in the wins table, one pooled row
    assert len(rows) == 2 + len(outliers_tabular.METRICS) + 1
    assert all("nan" not in row for row in rows)
    for label, _ in outliers_tabular.METRICS.values():
        assert label in table
