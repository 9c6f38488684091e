"""Issue 12's digits bar over many seeds: does the served MC predictive beat the plain model?

    python bench/digits_seeds.py [--seeds 0 1 2 3 4] [--eval-seeds 0] [--jobs 2] [--repository DIR]

Trains the default classifier once per seed (``python -m training --seed S``, its own split and
initialisation; ``--jobs`` processes at once; models already in ``--repository`` are reused), scores
each through its exported SavedModel with ``training.report.evaluate`` at every evaluation seed
(the MC masks and the noise images), and counts the seeds at which the calibrated MC predictive has
lower NLL and lower ECE than the uncalibrated deterministic prediction, and MC mutual information
tells both OOD sets from test digits with AUROC >= 0.9. How decisive a seed's 180 test digits are: each
seed's ECE floors (``metrics.ece_floor``, the ECE a perfectly calibrated prediction with the same
confidences would show), and all seeds' test rows pooled into one test set, large enough for ECE
to rank the two predictions (with a paired-bootstrap interval of the difference).

Writes ``bench/results/digits-seeds-<time>.json`` and ``.md``. Extra arguments after ``--`` go to
``python -m training`` (the test uses ``-- --epochs 2 --hidden 16``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench import trained  # noqa: E402
from training import conformal_report, metrics  # noqa: E402
from training.report import evaluate, load_predictions, prediction_key  # noqa: E402

REFERENCE = "deterministic (uncalibrated)"
OOD_MEASURE = "mc mutual information"
OOD_BAR = 0.9


def train(seed: int, repository: Path, extra: list[str]) -> Path:
    """The seed's model (trained unless the repository has it): its version folder."""
    return trained.train(repository, f"digits-seed-{seed}", ["--seed", str(seed), *extra])[0]


def verdict(report: dict) -> dict:
    """One model at one evaluation seed against the bar."""
    mc, reference = report["scores"]["mc"], report["scores"][REFERENCE]
    lowest_auroc = min(values[OOD_MEASURE] for values in report["ood_auroc"].values())
    return {
        "nll": [mc["nll"], reference["nll"]],
        "ece": [mc["ece"], reference["ece"]],
        "ece_floor": [mc["ece_floor"], reference["ece_floor"]],
        "lowest_ood_auroc": lowest_auroc,
        "nll_met": mc["nll"] < reference["nll"],
        "ece_met": mc["ece"] < reference["ece"],
        "ece_above_floor_lower": mc["ece"] - mc["ece_floor"] < reference["ece"] - reference["ece_floor"],
        "ood_met": lowest_auroc >= OOD_BAR,
    }


def pooled(report_dirs: list[Path]) -> dict:
    """Every seed's test rows as one test set: MC as served against the reference, with enough rows for ECE."""
    labels, kinds = load_predictions(report_dirs)
    mc, reference = kinds[prediction_key("mc")], kinds[prediction_key(REFERENCE)]
    return {
        "rows": len(labels),
        "by_prediction": {
            key: {"nll": metrics.nll(p, labels), "ece": metrics.ece(p, labels), "ece_floor": metrics.ece_floor(p)}
            for key, p in kinds.items()
        },
        **{
            name: {
                "mc": float(getattr(metrics, name)(mc, labels)),
                "reference": float(getattr(metrics, name)(reference, labels)),
                **metrics.paired_bootstrap(getattr(metrics, name), mc, reference, labels, rounds=500),
            }
            for name in ("nll", "ece")
        },
    }


def summary(results: dict[int, dict[int, dict]], seeds: list[int]) -> dict[int, dict]:
    """Per evaluation seed: bars met over all seeds, and per block of five consecutive seeds."""
    out = {}
    for eval_seed, by_seed in results.items():
        rows = [by_seed[s] for s in seeds]
        blocks = [seeds[i : i + 5] for i in range(0, len(seeds) - 4, 5)]
        out[eval_seed] = {
            "seeds": len(rows),
            **{f"{bar}_met": sum(r[f"{bar}_met"] for r in rows) for bar in ("nll", "ece", "ood")},
            "ece_met_per_block_of_five": [sum(by_seed[s]["ece_met"] for s in block) for block in blocks],
            "ece_above_floor_lower": sum(r["ece_above_floor_lower"] for r in rows),
            "mean_ece": [sum(r["ece"][i] for r in rows) / len(rows) for i in (0, 1)],
            "mean_nll": [sum(r["nll"][i] for r in rows) / len(rows) for i in (0, 1)],
            "mean_ece_floor": [sum(r["ece_floor"][i] for r in rows) / len(rows) for i in (0, 1)],
        }
    return out


def markdown(results: dict[int, dict[int, dict]], summaries: dict[int, dict]) -> str:
    lines = []
    for eval_seed, by_seed in results.items():
        s = summaries[eval_seed]
        lines += [
            f"## Evaluation seed {eval_seed}",
            "",
            f"NLL bar {s['nll_met']} of {s['seeds']}, ECE bar {s['ece_met']} of {s['seeds']}, "
            f"OOD bar {s['ood_met']} of {s['seeds']}; ECE bar per block of five seeds: "
            f"{', '.join(map(str, s['ece_met_per_block_of_five']))}; mean ECE MC {s['mean_ece'][0]:.4f} "
            f"against {s['mean_ece'][1]:.4f} (ECE floors {s['mean_ece_floor'][0]:.4f} and "
            f"{s['mean_ece_floor'][1]:.4f}), mean NLL {s['mean_nll'][0]:.4f} against {s['mean_nll'][1]:.4f}. "
            f"ECE above its floor lower for MC at {s['ece_above_floor_lower']} of {s['seeds']} seeds.",
            "",
        ]
        if "pooled" in s:
            p = s["pooled"]
            lines += [
                f"All seeds' test rows as one set ({p['rows']} rows), MC as served against the uncalibrated "
                "deterministic prediction, 90 % paired-bootstrap interval of the difference: "
                + "; ".join(
                    f"{name.upper()} {p[name]['mc']:.4f} against {p[name]['reference']:.4f} "
                    f"[{p[name]['low']:+.4f}, {p[name]['high']:+.4f}], MC lower in {p[name]['share_lower']:.0%}"
                    for name in ("nll", "ece")
                )
                + ".",
                "",
                "| pooled test rows | NLL | ECE | ECE floor |",
                "|---|---|---|---|",
                *(
                    f"| {key} | {v['nll']:.4f} | {v['ece']:.4f} | {v['ece_floor']:.4f} |"
                    for key, v in p["by_prediction"].items()
                ),
                "",
            ]
        if "conformal" in s:
            lines += [*conformal_report.pooled_markdown(s["conformal"]), ""]
        lines += [
            "| seed | NLL MC cal. / det. uncal. | ECE MC cal. / det. uncal. | ECE floor MC / det. "
            "| lowest OOD AUROC | bars met |",
            "|---|---|---|---|---|---|",
        ]
        for seed, r in by_seed.items():
            met = ", ".join(bar.upper() for bar in ("nll", "ece", "ood") if r[f"{bar}_met"]) or "none"
            lines.append(
                f"| {seed} | {r['nll'][0]:.4f} / {r['nll'][1]:.4f} | {r['ece'][0]:.4f} / {r['ece'][1]:.4f} "
                f"| {r['ece_floor'][0]:.4f} / {r['ece_floor'][1]:.4f} "
                f"| {r['lowest_ood_auroc']:.3f} | {met} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--samples", type=int, default=100, help="MC samples T of the evaluation")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once")
    parser.add_argument("--repository", type=Path, default=ROOT / "bench" / "results" / "digits-seeds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    with ThreadPoolExecutor(args.jobs) as pool:
        versions = dict(zip(args.seeds, pool.map(lambda s: train(s, args.repository, extra), args.seeds), strict=True))
    results: dict[int, dict[int, dict]] = {}
    report_dirs: dict[int, list[Path]] = {}
    for eval_seed in args.eval_seeds:
        results[eval_seed], report_dirs[eval_seed] = {}, []
        for seed, version in versions.items():
            folder = args.repository / "reports" / f"seed-{seed}-eval-{eval_seed}"
            results[eval_seed][seed] = verdict(evaluate(version, folder, args.samples, eval_seed))
            report_dirs[eval_seed].append(folder)
            print(f"eval seed {eval_seed}, seed {seed}: {results[eval_seed][seed]}", flush=True)
    summaries = summary(results, args.seeds)
    for eval_seed, folders in report_dirs.items():
        summaries[eval_seed]["pooled"] = pooled(folders)
        if all((folder / conformal_report.ARRAYS).exists() for folder in folders):
            summaries[eval_seed]["conformal"] = conformal_report.pooled(folders)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"seeds": args.seeds, "training_args": extra, "results": results, "summary": summaries}
    (args.out / f"digits-seeds-{stamp}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"digits-seeds-{stamp}.md").write_text(markdown(results, summaries))
    print(markdown(results, summaries))
    return record


if __name__ == "__main__":
    main()
