"""UCI results as files: mean and standard error over splits, the published numbers, Markdown tables."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PUBLISHED = {
    "bostonHousing": {"rmse": (2.90, 0.18), "ll": (-2.40, 0.04)},
    "concrete": {"rmse": (4.82, 0.16), "ll": (-2.93, 0.02)},
    "energy": {"rmse": (0.54, 0.06), "ll": (-1.21, 0.01)},
}
"""Published MC-dropout results ("Experiment 1" of DropoutUncertaintyExps' README): mean, standard error."""


INTERVAL_KEYS = (
    "calibrated_coverage_conformal",
    "calibrated_width_conformal",
    "calibrated_coverage_gaussian",
    "calibrated_width_gaussian",
    "coverage_gaussian",
    "width_gaussian",
)
"""Per split, 90 % intervals: the calibrated (grid) network's conformal and Gaussian ones, the final one's Gaussian."""


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over splits, as the paper's code computes it: ``np.std(values) / sqrt(n)``."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def variant(likelihood: str, dropout: str) -> str:
    """The suffix naming a model variant's files and split models: ``-heteroscedastic``, ``-concrete``, both or none."""
    return ("-heteroscedastic" if likelihood == "heteroscedastic" else "") + (
        "-concrete" if dropout == "concrete" else ""
    )


def rates_text(row: dict) -> str:
    """A split's dropout: its fixed p, or its learned rates (input / hidden)."""
    if row.get("learned_rates"):
        scale = f" (s = {row['concrete_scale']:.3g})" if row.get("concrete_scale", 1.0) != 1.0 else ""
        return " / ".join(f"{rate:.3g}" for rate in row["learned_rates"]) + scale
    return format(row["p"], "g")


def markdown(result: dict) -> str:
    """The results as a Markdown table: mean ± standard error, the published numbers, then every split."""
    s, proto, t = result["summary"], result["protocol"], result["timings"]

    likelihood = proto.get("likelihood", "homoscedastic")
    concrete = proto.get("dropout") == "concrete"
    grid = f"p ∈ {proto['dropout_rates']}" if not concrete else f"none for p (learned from {proto['initial_rate']:g})"
    if len(proto.get("concrete_scales") or []) > 1:
        grid += f" x regularizer scale s ∈ {proto['concrete_scales']}"
    if proto.get("tau_values"):
        grid += f" x τ ∈ {proto['tau_values']}"

    def pm(entry: dict) -> str:
        return f"{entry['mean']:.2f} ± {entry['standard_error']:.2f}"

    lines = [
        f"# {result['dataset']}: MC {'concrete ' if concrete else ''}dropout ({likelihood}), "
        "Gal & Ghahramani's UCI protocol",
        "",
        f"{len(result['splits'])} splits, {proto['epochs']} epochs, grid {grid}, "
        f"T = {proto['samples']:,} test samples from the exported `mc_dropout` "
        f"signature, seed {proto['seed']}. Wall time {t['total_s']:.0f} s (grid search {t['grid_search_s']:.0f} s, "
        f"validation MC {t['validation_mc_s']:.0f} s, retrain {t['retrain_s']:.0f} s, export + test MC "
        f"{t['export_and_test_mc_s']:.0f} s) on {result['machine']['cpus']} CPU cores.",
        "",
        "| | MC RMSE | deterministic RMSE | test LL |",
        "|---|---|---|---|",
        f"| ours (mean ± s.e.) | {pm(s['rmse_mc'])} | {pm(s['rmse_deterministic'])} | {pm(s['ll'])} |",
    ]
    if result.get("published"):
        ref = result["published"]
        lines.append(
            f"| published | {ref['rmse'][0]:.2f} ± {ref['rmse'][1]:.2f} | | {ref['ll'][0]:.2f} ± {ref['ll'][1]:.2f} |"
        )
    if concrete:
        rates = ", ".join(
            f"{layer} {s[f'rate_{layer}']['mean']:.4f} ± {s[f'rate_{layer}']['standard_error']:.4f}"
            for layer in ("input", "hidden")
        )
        lines += ["", f"Learned dropout rates of the final networks (mean ± s.e. over splits): {rates}."]
    if "calibrated_coverage_conformal" in s:
        lines += ["", *_interval_lines(result)]
    lines += [
        "",
        "| split | p (learned: input / hidden) | τ | validation LL | MC RMSE | deterministic RMSE | test LL |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['split']} | {rates_text(r)} | {'—' if r['tau'] is None else format(r['tau'], 'g')} | "
        f"{r['log_likelihood']:.3f} | {r['rmse_mc']:.3f} | {r['rmse_deterministic']:.3f} | {r['ll']:.3f} |"
        for r in result["splits"]
    ]
    return "\n".join(lines) + "\n"


def _interval_lines(result: dict) -> list[str]:
    """The 90 % intervals: coverage and mean width, mean ± s.e. over splits, then per split."""
    s = result["summary"]

    def cell(key: str, digits: int) -> str:
        return f"{s[key]['mean']:.{digits}f} ± {s[key]['standard_error']:.{digits}f}"

    lines = [
        "90 % intervals on the test rows. Calibrated network: the split's chosen grid network (trained on the "
        "first 80 % of the training split), its conformal interval calibrated on the last 20 % (which also "
        "chose its grid point); final network: the one above, retrained on the whole split (Gaussian only).",
        "",
        "| | conformal, calibrated net | Gaussian, calibrated net | Gaussian, final net |",
        "|---|---|---|---|",
        f"| coverage | {cell('calibrated_coverage_conformal', 3)} | {cell('calibrated_coverage_gaussian', 3)} "
        f"| {cell('coverage_gaussian', 3)} |",
        f"| mean width | {cell('calibrated_width_conformal', 2)} | {cell('calibrated_width_gaussian', 2)} "
        f"| {cell('width_gaussian', 2)} |",
        "",
        "| split | coverage conformal / Gaussian (calibrated net) | width conformal / Gaussian | "
        "coverage / width Gaussian (final net) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['split']} | {r['calibrated_coverage_conformal']:.3f} / {r['calibrated_coverage_gaussian']:.3f} "
        f"| {r['calibrated_width_conformal']:.2f} / {r['calibrated_width_gaussian']:.2f} "
        f"| {r['coverage_gaussian']:.3f} / {r['width_gaussian']:.2f} |"
        for r in result["splits"]
    ]
    return lines


def write_results(result: dict, out: str | Path) -> tuple[Path, Path]:
    """``<out>/<dataset><variant>.json`` and ``.md`` (``variant``: e.g. ``-heteroscedastic-concrete``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    proto = result["protocol"]
    stem = result["dataset"] + variant(proto.get("likelihood", "homoscedastic"), proto.get("dropout", "grid"))
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path
