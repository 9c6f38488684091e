"""Does the outlier-disagreement term (``--outlier-weight``) help or hurt on tabular classifiers?

    python bench/outliers_tabular.py [--datasets wine breast_cancer] [--seeds 0 1 2 3 4]
        [--weights 0.5 0] [--samples 100] [--workdir DIR] [--out DIR] [-- extra training options]

The term (training/outliers.py) was chosen and evaluated on the 8x8 digits only, yet it is on by
default for every classifier, a user's CSV included, where its synthetic outliers are training rows
with their (standardized) features shuffled. This measures it on tabular data that ships with
scikit-learn (nothing is downloaded): each data set is written as a CSV with a ``target`` column
under ``<workdir>/data``, and for every data set, outlier weight and seed the script runs, one
training at a time,

    python -m training --data <workdir>/data/<set>.csv --target target --artifacts <workdir>/models
        --name <set>-w<weight>-s<seed> --seed <seed> --outlier-weight <weight> --if-missing

(every other option at its default, so a seed's split and initialisation are the same at each
weight; models already in ``<workdir>/models`` are reused) and scores the version with
``training.report.evaluate`` (what ``python -m training evaluate`` runs; report in
``<workdir>/reports/<name>``).

What it measures, per model:

- from the version's metadata.json (held-out test rows, MC at the training seed): accuracy, NLL
  and ECE of the calibrated MC predictive (as served) and of the uncalibrated deterministic
  prediction (the plain network);
- from evaluate's report.json: OOD AUROC of MC mutual information against evaluate's two sets,
  uniform noise over the *global* feature range and inverted features (both use one min and max
  over all features, so on tabular data with features of very different scales they lie far
  outside the data: an easy test);
- one harder set added here: uniform noise inside each feature's own training range (the
  per-feature box), AUROC of MC mutual information.

It prints (and writes to ``<out>/outliers-tabular-<time>.md`` and ``.json``) a markdown table per
data set and weight of the mean ± standard deviation over seeds; per metric, how many seeds each
weight wins (ties counted apart) and the mean paired difference against weight 0; and the
paired bootstrap of all seeds' test rows pooled (the same rows at each weight), MC as served.
Extra arguments after ``--`` go to ``python -m training`` (the test uses
``-- --epochs 2 --hidden 8``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import trained  # noqa: E402

DATASETS = ("wine", "breast_cancer", "iris")
BASELINE = 0.0
"""The weight every other weight is compared with: the term off, the previous model exactly."""

METRICS = {
    # key: (label, higher is better)
    "acc_mc": ("accuracy MC", True),
    "nll_mc": ("NLL MC", False),
    "ece_mc": ("ECE MC", False),
    "nll_det": ("NLL det. uncal.", False),
    "ece_det": ("ECE det. uncal.", False),
    "auroc_uniform": ("AUROC MI uniform", True),
    "auroc_inverted": ("AUROC MI inverted", True),
    "auroc_box": ("AUROC MI box", True),
}


def write_csv(name: str, folder: Path) -> Path:
    """scikit-learn's ``load_<name>`` as a CSV with a ``target`` column (integer class)."""
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    path = folder / f"{name}.csv"
    folder.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([column.replace(" ", "_") for column in bunch.feature_names] + ["target"])
        for x, y in zip(bunch.data, bunch.target, strict=True):
            writer.writerow([repr(float(v)) for v in x] + [int(y)])
    return path


def model_name(dataset: str, weight: float, seed: int) -> str:
    return f"{dataset.replace('_', '-')}-w{weight:g}-s{seed}"


def train(data: Path, repository: Path, name: str, weight: float, seed: int, extra: list[str]) -> tuple[Path, float]:
    """The model's version folder (trained unless the repository has it) and the training's wall time."""
    arguments = ["--data", str(data), "--target", "target", "--seed", str(seed), "--outlier-weight", f"{weight:g}"]
    return trained.train(repository, name, [*arguments, *extra])


def box_auroc(version: Path, samples: int, seed: int) -> float:
    """AUROC of MC mutual information: test rows against uniform noise inside each feature's training range."""
    import tensorflow as tf

    from training import artifact, signatures
    from training.report import held_out_rows, ood_auroc
    from training.uncertainty import summarize_classification

    meta = artifact.read_metadata(version)
    rows = held_out_rows(meta)
    train_rows, test = rows.train, rows.test
    rng = np.random.default_rng(seed)
    box = rng.uniform(train_rows.x.min(axis=0), train_rows.x.max(axis=0), size=test.x.shape).astype(np.float32)
    mc = tf.saved_model.load(str(version)).signatures[artifact.MC_SIGNATURE]

    def information(x: np.ndarray) -> np.ndarray:
        draws = signatures.mc_draws(mc, x.astype(np.float32), samples, seed)
        return summarize_classification(draws.outputs, draws.predictive).mutual_information

    return ood_auroc(information(test.x), information(box))


def score(version: Path, report_dir: Path, samples: int) -> dict[str, float]:
    """One model's numbers (see the module docstring)."""
    from training.report import evaluate

    scores = json.loads((version / "metadata.json").read_text())["metrics"]
    report = evaluate(version, report_dir, samples, 0)
    information = "mc mutual information"
    return {
        "acc_mc": scores["test_mc"]["accuracy"],
        "nll_mc": scores["test_mc"]["nll"],
        "ece_mc": scores["test_mc"]["ece"],
        "nll_det": scores["test_deterministic_uncalibrated"]["nll"],
        "ece_det": scores["test_deterministic_uncalibrated"]["ece"],
        "auroc_uniform": report["ood_auroc"]["uniform noise"][information],
        "auroc_inverted": report["ood_auroc"]["inverted"][information],
        "auroc_box": box_auroc(version, samples, 0),
    }


def wins(results: dict, dataset: str, weights: list[float], seeds: list[int]) -> dict[str, dict[str, int]]:
    """Per metric: seeds at which each weight is strictly best, and ties."""
    out = {}
    for key, (_, higher) in METRICS.items():
        counts = {f"{w:g}": 0 for w in weights} | {"tie": 0}
        for seed in seeds:
            values = {w: results[dataset][f"{w:g}"][str(seed)][key] for w in weights}
            best = max(values.values()) if higher else min(values.values())
            leaders = [w for w, v in values.items() if v == best]
            counts[f"{leaders[0]:g}" if len(leaders) == 1 else "tie"] += 1
        out[key] = counts
    return out


def pooled(report_root: Path, dataset: str, weights: list[float], seeds: list[int]) -> dict[str, dict]:
    """All seeds' test rows as one set, MC as served: each weight against the baseline, paired bootstrap."""
    from training import metrics
    from training.report import load_predictions, prediction_key

    def rows(weight: float) -> tuple[np.ndarray, np.ndarray]:
        labels, predictions = load_predictions(report_root / model_name(dataset, weight, s) for s in seeds)
        return labels, predictions[prediction_key("mc")]

    labels, baseline = rows(BASELINE)
    out = {}
    for weight in weights:
        if weight == BASELINE:
            continue
        same_labels, predictions = rows(weight)
        assert np.array_equal(labels, same_labels), "a seed's test rows differ between weights"
        out[f"{weight:g}"] = {
            "rows": len(labels),
            **{
                name: metrics.paired_bootstrap(getattr(metrics, name), predictions, baseline, labels, rounds=1000)
                for name in ("nll", "ece")
            },
        }
    return out


def summarize(results: dict, weights: list[float], seeds: list[int]) -> dict:
    summary = {}
    for dataset, by_weight in results.items():
        entry = {"mean": {}, "std": {}, "difference": {}}
        for w in weights:
            values = {key: np.array([by_weight[f"{w:g}"][str(s)][key] for s in seeds]) for key in METRICS}
            entry["mean"][f"{w:g}"] = {key: float(v.mean()) for key, v in values.items()}
            entry["std"][f"{w:g}"] = {key: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for key, v in values.items()}
            if w != BASELINE and f"{BASELINE:g}" in by_weight:
                differences = {
                    key: np.array(
                        [by_weight[f"{w:g}"][str(s)][key] - by_weight[f"{BASELINE:g}"][str(s)][key] for s in seeds]
                    )
                    for key in METRICS
                }
                entry["difference"][f"{w:g}"] = {
                    key: {
                        "mean": float(d.mean()),
                        "standard_error": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
                    }
                    for key, d in differences.items()
                }
        entry["wins"] = wins(results, dataset, weights, seeds)
        summary[dataset] = entry
    return summary


def markdown(summary: dict, weights: list[float], seeds: list[int], test_rows: dict[str, int]) -> str:
    keys = list(METRICS)
    lines = [
        f"Means ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}); MC = the calibrated "
        "MC predictive as served, det. uncal. = the plain network; AUROC of MC mutual information, test rows "
        "against uniform noise over the global feature range, inverted features, and uniform noise inside each "
        "feature's training range (box).",
        "",
        "| data set (test rows) | outlier weight | " + " | ".join(METRICS[k][0] for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for dataset, entry in summary.items():
        for w in weights:
            mean, std = entry["mean"][f"{w:g}"], entry["std"][f"{w:g}"]
            cells = " | ".join(f"{mean[k]:.4f} ± {std[k]:.4f}" for k in keys)
            lines.append(f"| {dataset} ({test_rows[dataset]}) | {w:g} | {cells} |")
    lines += [
        "",
        "Seeds won (strictly better at the same seed; ties apart), and the mean paired difference "
        f"(weight minus {BASELINE:g}) ± its standard error over seeds:",
        "",
        "| data set | metric | " + " | ".join(f"{w:g} wins" for w in weights) + " | ties | mean difference |",
        "|---|---|" + "---|" * (len(weights) + 2),
    ]
    for dataset, entry in summary.items():
        for k in keys:
            counts = entry["wins"][k]
            difference = "; ".join(
                f"{w}: {d[k]['mean']:+.4f} ± {d[k]['standard_error']:.4f}" for w, d in entry["difference"].items()
            )
            lines.append(
                f"| {dataset} | {METRICS[k][0]} | "
                + " | ".join(str(counts[f"{w:g}"]) for w in weights)
                + f" | {counts['tie']} | {difference or '-'} |"
            )
    if any(entry.get("pooled") for entry in summary.values()):
        lines += [
            "",
            "All seeds' test rows pooled (the same rows at each weight), MC as served (evaluation masks, seed 0): "
            f"weight minus {BASELINE:g}, 90 % paired-bootstrap interval, share of resamples where the weight is lower.",
            "",
            "| data set | weight | rows | NLL difference | 90 % interval | lower in | ECE difference | 90 % interval "
            "| lower in |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for dataset, entry in summary.items():
            for w, p in entry.get("pooled", {}).items():
                cells = " | ".join(
                    f"{p[n]['difference']:+.4f} | [{p[n]['low']:+.4f}, {p[n]['high']:+.4f}] | {p[n]['share_lower']:.0%}"
                    for n in ("nll", "ece")
                )
                lines.append(f"| {dataset} | {w} | {p['rows']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=["wine", "breast_cancer"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5, BASELINE])
    parser.add_argument("--samples", type=int, default=100, help="MC samples T of the evaluation")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "outliers-tabular")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    seconds: dict[str, float] = {}
    test_rows: dict[str, int] = {}
    for dataset in args.datasets:
        data = write_csv(dataset, args.workdir / "data")
        results[dataset] = {f"{w:g}": {} for w in args.weights}
        for seed in args.seeds:
            for weight in args.weights:
                name = model_name(dataset, weight, seed)
                version, seconds[name] = train(data, args.workdir / "models", name, weight, seed, extra)
                report_dir = args.workdir / "reports" / name
                results[dataset][f"{weight:g}"][str(seed)] = score(version, report_dir, args.samples)
                test_rows[dataset] = json.loads((report_dir / "report.json").read_text())["test_rows"]
                print(f"{name}: {seconds[name]:.1f} s, {results[dataset][f'{weight:g}'][str(seed)]}", flush=True)
    summary = summarize(results, args.weights, args.seeds)
    if BASELINE in args.weights:
        for dataset in args.datasets:
            summary[dataset]["pooled"] = pooled(args.workdir / "reports", dataset, args.weights, args.seeds)
    table = markdown(summary, args.weights, args.seeds, test_rows)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "datasets": args.datasets,
        "seeds": args.seeds,
        "weights": args.weights,
        "training_args": extra,
        "training_seconds": seconds,
        "test_rows": test_rows,
        "results": results,
        "summary": summary,
    }
    (args.out / f"outliers-tabular-{stamp}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"outliers-tabular-{stamp}.md").write_text(table)
    print(table)
    return record


if __name__ == "__main__":
    main()
