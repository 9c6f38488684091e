"""The conformal part of ``python -m training evaluate``: coverage, set sizes, abstention, risk-coverage.

Two predictions of the same test rows, each with sets and an abstention rule built the same way
on the same calibration rows: the MC predictive as served (the scores stored in the artifact, the
test rows' predictive from ``mc_dropout`` at the evaluation's T and seed, tie-breaks from that
seed, as a server answers a request with that seed) and the plain softmax (``serving_default``
before temperature calibration: what the Keras model alone gives). Nothing is chosen on test rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from training import artifact, conformal, metrics
from training.data import Dataset
from training.signatures import Samples
from training.uncertainty import summarize_classification

ALPHAS = (0.05, 0.1, 0.2)
RISKS = (0.01, 0.05)
MC, PLAIN = "mc", "plain softmax"
ARRAYS = "conformal.npz"
"""Per-row results (coverage, set sizes, uncertainties, acceptance) keyed by ``array_key``, for pooling."""


def array_key(*parts: object) -> str:
    return "_".join(str(p).replace(" ", "-") for p in parts)


def _boxes(count: int, seed: int) -> np.ndarray:
    """Rectangular frames of full intensity on an 8 x 8 image (the README's box and its kin), flattened."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 8, 8), np.float32)
    for image in images:
        top, left = rng.integers(0, 3, 2)
        bottom, right = rng.integers(5, 8, 2)
        image[top : bottom + 1, [left, right]] = 16.0
        image[[top, bottom], left : right + 1] = 16.0
    return images.reshape(count, 64)


def evaluate(
    meta: artifact.ModelMetadata,
    calibration: Dataset | None,
    test: Dataset,
    plain: Callable[[np.ndarray], np.ndarray],
    mc: Callable[[np.ndarray, int, int], Samples],
    out_of_distribution: dict[str, np.ndarray],
    samples: int,
    seed: int,
) -> tuple[dict, dict[str, np.ndarray]]:
    """The report's ``conformal`` section and the per-row arrays; ``calibration`` the rows the version was
    calibrated on (``report.held_out_rows``), ``plain(x)`` the uncalibrated softmax, ``mc(x, T, seed)`` the
    ``mc_dropout`` draws."""
    stored = meta.conformal
    if stored is None or stored.correct is None:
        return {"available": False, "reason": "the version stores no conformal calibration"}, {}
    if calibration is None or len(calibration.y) != stored.rows:
        raise ValueError("the version's calibration rows cannot be re-derived from its training settings")
    ood = dict(out_of_distribution)
    if meta.input_shape in ([64], [8, 8, 1]):
        ood["boxes"] = _boxes(len(test.y), seed).reshape(-1, *meta.input_shape)

    score, uncertainty_name = stored.score, stored.uncertainty or conformal.UNCERTAINTIES[0]

    def served(x: np.ndarray, t: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        draws = mc(x, t, s)
        summary = summarize_classification(draws.outputs, draws.predictive)
        return summary.mean, summary.mutual_information

    def softmax(x: np.ndarray, _t: int, _s: int) -> tuple[np.ndarray, np.ndarray]:
        return plain(x), np.zeros(len(x))  # one deterministic pass: no samples to disagree

    def uncertainty(predicted: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return conformal.uncertainty(uncertainty_name, *predicted)

    cal_u = conformal.tie_breaks(calibration.x, stored.seed)
    cal_mc, _ = served(calibration.x, stored.samples, stored.seed)
    cal_scores = conformal.set_scores(score, cal_mc, calibration.y, cal_u)
    reproduced = np.allclose(np.sort(cal_scores), stored.scores, atol=1e-9)
    cal_plain = softmax(calibration.x, 0, 0)
    predictions = {
        MC: (np.asarray(stored.scores), np.asarray(stored.uncertainties), np.asarray(stored.correct), served),
        PLAIN: (
            np.sort(conformal.set_scores(score, cal_plain[0], calibration.y, cal_u)),
            uncertainty(cal_plain),
            cal_plain[0].argmax(-1) == calibration.y,
            softmax,
        ),
    }
    test_u = conformal.tie_breaks(test.x, seed)
    section: dict = {
        "available": True,
        "calibration": {
            "rows": stored.rows,
            "source": stored.source,
            "samples": stored.samples,
            "seed": stored.seed,
            "scores_reproduced": bool(reproduced),
            "same_samples_as_evaluation": stored.samples == samples,
            "score": score,
            "uncertainty": uncertainty_name,
        },
        "delta": stored.delta,
        "sets": {},
        "abstention": {},
    }
    arrays: dict[str, np.ndarray] = {}
    for kind, (scores, cal_uncertainty, cal_correct, predict) in predictions.items():
        predicted = predict(test.x, samples, seed)
        probs = predicted[0]
        section["sets"][kind] = {}
        for alpha in ALPHAS:
            sets = conformal.sets(score, probs, conformal.quantile(scores, alpha), test_u)
            covered, sizes = sets[np.arange(len(test.y)), test.y], sets.sum(axis=1)
            arrays[array_key(kind, "covered", alpha)], arrays[array_key(kind, "size", alpha)] = covered, sizes
            section["sets"][kind][str(alpha)] = set_summary(covered, sizes)
        test_uncertainty, correct = uncertainty(predicted), probs.argmax(-1) == test.y
        arrays[array_key(kind, "uncertainty")], arrays[array_key(kind, "correct")] = test_uncertainty, correct
        ood_uncertainty = {name: uncertainty(predict(x, samples, seed)) for name, x in ood.items()}
        section["abstention"][kind] = {}
        for risk in RISKS:
            threshold = conformal.abstention_threshold(cal_uncertainty, cal_correct, risk, stored.delta)
            accepted = test_uncertainty <= threshold
            arrays[array_key(kind, "accepted", risk)] = accepted
            abstained = {name: float(np.mean(u > threshold)) for name, u in ood_uncertainty.items()}
            section["abstention"][kind][str(risk)] = {
                "threshold": threshold,
                **selective_summary(accepted, correct),
                "ood_abstained": abstained,
            }
            for name, u in ood_uncertainty.items():
                arrays[array_key(kind, "ood", name, "abstained", risk)] = u > threshold
    return section, arrays


def set_summary(covered: np.ndarray, sizes: np.ndarray) -> dict[str, float]:
    coverage = float(np.mean(covered))
    return {
        "coverage": coverage,
        "coverage_standard_error": math.sqrt(coverage * (1 - coverage) / len(covered)),
        "mean_size": float(np.mean(sizes)),
        "empty": float(np.mean(sizes == 0)),
        "singletons": float(np.mean(sizes == 1)),
    }


def selective_summary(accepted: np.ndarray, correct: np.ndarray) -> dict[str, float | int]:
    kept = int(accepted.sum())
    return {
        "accepted": float(np.mean(accepted)),
        "accepted_rows": kept,
        "errors_among_accepted": int((~correct[accepted]).sum()),
        "error_among_accepted": float((~correct[accepted]).mean()) if kept else 0.0,
    }


def risk_coverage(uncertainty: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share accepted and error among accepted when the ``k`` least uncertain rows are kept, ``k = 1 … n``."""
    errors = ~np.asarray(correct)[np.argsort(uncertainty, kind="stable")]
    kept = np.arange(1, len(errors) + 1)
    return kept / len(errors), np.cumsum(errors) / kept


def plot_risk_coverage(arrays: dict[str, np.ndarray], section: dict, path: Path) -> None:
    """Error among accepted test rows against the share accepted, per prediction, with the calibrated rules."""
    figure = Figure(figsize=(7, 4.5))
    ax = figure.subplots()
    for kind, colour in ((MC, "tab:blue"), (PLAIN, "tab:orange")):
        share, risk = risk_coverage(arrays[array_key(kind, "uncertainty")], arrays[array_key(kind, "correct")])
        ax.plot(share, risk, color=colour, label=f"{kind}: keep the least uncertain")
        for target, rule in section["abstention"][kind].items():
            ax.plot(rule["accepted"], rule["error_among_accepted"], "o", color=colour, markeredgecolor="black")
            ax.annotate(f"risk {target}", (rule["accepted"], rule["error_among_accepted"]), fontsize=8)
    ax.set(xlabel="share of test rows accepted", ylabel="error among accepted", xlim=(0.5, 1.0), ylim=(0, None))
    ax.set_title("Risk-coverage on test rows; dots: rules calibrated at each risk")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(section: dict) -> list[str]:
    if not section.get("available"):
        return ["", f"Conformal prediction: not available ({section['reason']})."]
    c = section["calibration"]
    lines = [
        "",
        f"Conformal prediction sets ({c['score']}), {c['rows']} calibration rows ({c['source']}); stored scores "
        f"{'reproduced' if c['scores_reproduced'] else 'NOT reproduced'} through mc_dropout (T = {c['samples']}, "
        f"seed {c['seed']}){'' if c['same_samples_as_evaluation'] else '; the evaluation uses another T'}.",
        "",
        "| prediction | 1 - alpha | coverage (± s.e.) | mean set size | empty sets | singletons |",
        "|---|---|---|---|---|---|",
    ]
    for kind, by_alpha in section["sets"].items():
        for alpha, s in by_alpha.items():
            lines.append(
                f"| {kind} | {1 - float(alpha):.2f} | {s['coverage']:.3f} ± {s['coverage_standard_error']:.3f} "
                f"| {s['mean_size']:.3f} | {s['empty']:.3f} | {s['singletons']:.3f} |"
            )
    names = list(next(iter(next(iter(section["abstention"].values())).values()))["ood_abstained"])
    lines += [
        "",
        f"Abstention (accept when {c['uncertainty']} is at most the threshold; error among accepted at most the "
        f"risk with probability {1 - section['delta']:.2f}, Clopper-Pearson, fixed sequence):",
        "",
        "| prediction | risk | accepted | errors / accepted | error among accepted | "
        + " | ".join(f"{n} abstained" for n in names)
        + " |",
        "|---" * (5 + len(names)) + "|",
    ]
    for kind, by_risk in section["abstention"].items():
        for risk, r in by_risk.items():
            lines.append(
                f"| {kind} | {risk} | {r['accepted']:.3f} | {r['errors_among_accepted']} / {r['accepted_rows']} "
                f"| {r['error_among_accepted']:.4f} | "
                + " | ".join(f"{r['ood_abstained'][n]:.3f}" for n in names)
                + " |"
            )
    return lines


def pooled(report_dirs: list[Path], alpha: float = 0.1, risk: float = 0.01) -> dict:
    """Several reports' conformal rows (one per seed): per-seed coverage, pooled sizes and abstention."""
    files = [np.load(folder / ARRAYS) for folder in report_dirs]
    out: dict = {"seeds": len(files), "alpha": alpha, "risk": risk}
    for kind in (MC, PLAIN):
        coverage = [float(f[array_key(kind, "covered", alpha)].mean()) for f in files]
        sizes = np.concatenate([f[array_key(kind, "size", alpha)] for f in files])
        accepted = np.concatenate([f[array_key(kind, "accepted", risk)] for f in files])
        correct = np.concatenate([f[array_key(kind, "correct")] for f in files])
        prefix = array_key(kind, "ood")
        ood_names = sorted({key.split("_")[2] for key in files[0].files if key.startswith(prefix + "_")})
        out[kind] = {
            "coverage_per_seed": coverage,
            "mean_coverage": float(np.mean(coverage)),
            "lowest_coverage": float(np.min(coverage)),
            "mean_set_size": float(sizes.mean()),
            "empty": float(np.mean(sizes == 0)),
            **selective_summary(accepted, correct),
            "accepted_per_seed": [float(f[array_key(kind, "accepted", risk)].mean()) for f in files],
            "ood_abstained": {
                name: float(np.concatenate([f[array_key(kind, "ood", name, "abstained", risk)] for f in files]).mean())
                for name in ood_names
            },
        }
    mc_sizes = np.concatenate([f[array_key(MC, "size", alpha)] for f in files]).astype(np.float64)
    plain_sizes = np.concatenate([f[array_key(PLAIN, "size", alpha)] for f in files]).astype(np.float64)
    out["size_difference"] = metrics.paired_bootstrap(
        lambda first, _labels: float(np.mean(first)), mc_sizes, plain_sizes, np.zeros(len(mc_sizes)), rounds=500
    )
    return out


def pooled_markdown(p: dict) -> list[str]:
    d = p["size_difference"]
    names = list(p[MC]["ood_abstained"])
    lines = [
        f"Conformal sets at 1 - alpha = {1 - p['alpha']:.2f} and abstention at risk {p['risk']} over {p['seeds']} "
        f"seeds (each seed's test rows; sizes and abstention pooled). MC minus plain softmax mean set size "
        f"{d['difference']:+.3f}, 90 % paired-bootstrap interval [{d['low']:+.3f}, {d['high']:+.3f}].",
        "",
        "| prediction | mean coverage | lowest seed | mean set size | empty sets | accepted (risk) "
        "| errors / accepted | error among accepted | " + " | ".join(f"{n} abstained" for n in names) + " |",
        "|---" * (8 + len(names)) + "|",
    ]
    for kind in (MC, PLAIN):
        r = p[kind]
        lines.append(
            f"| {kind} | {r['mean_coverage']:.4f} | {r['lowest_coverage']:.4f} | {r['mean_set_size']:.3f} "
            f"| {r['empty']:.3f} | {r['accepted']:.4f} | {r['errors_among_accepted']} / {r['accepted_rows']} "
            f"| {r['error_among_accepted']:.4f} | " + " | ".join(f"{r['ood_abstained'][n]:.3f}" for n in names) + " |"
        )
    return lines
