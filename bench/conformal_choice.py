"""Which conformity score, abstention score and delta: weighed on calibration and validation rows, never test rows.

    python bench/conformal_choice.py --repository bench/results/digits-seeds-conformal [--seeds 0 1 …]

For each ``digits-seed-S`` model of a ``bench/digits_seeds.py`` repository: its 288 calibration rows
through ``mc_dropout`` as at export (T = 100, seed 0), its validation rows as a request with a fresh
seed gets them (seed 1), and the plain softmax of both. Sets and abstention rules are calibrated on
the calibration rows and measured on the validation rows, for every candidate, so the choice made in
``training.conformity`` (``SET_SCORE``, ``UNCERTAINTY``, ``DEFAULT_DELTA``) can be re-checked without
scoring a test row. Writes ``conformal-choice-<time>.md`` beside ``bench/digits_seeds.py``'s results.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import artifact, conformal, metrics, signatures  # noqa: E402
from training.data import split  # noqa: E402
from training.report import held_out_rows  # noqa: E402
from training.train import calibration_rows  # noqa: E402
from training.uncertainty import summarize_classification  # noqa: E402

ALPHA, RISK = 0.1, 0.01
DELTAS = (0.1, 0.2)
RAPS_PENALTY = 1.0
"""RAPS (Angelopoulos et al. 2021) with k_reg = 1: every label after the first costs this much score."""


def raps_scores(probabilities: np.ndarray, labels: np.ndarray, u: np.ndarray) -> np.ndarray:
    order = np.argsort(-probabilities, axis=-1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=-1)
    return conformal.aps_scores(probabilities, labels, u) + RAPS_PENALTY * rank


def raps_sets(probabilities: np.ndarray, threshold: float, u: np.ndarray) -> np.ndarray:
    classes = np.arange(probabilities.shape[1])
    members = [raps_scores(probabilities, np.full(len(probabilities), k), u) <= threshold for k in classes]
    return np.stack(members, axis=1)


SCORES = {**conformal.SET_SCORES, "raps": (raps_scores, raps_sets)}


def rows_of(version: Path) -> dict[str, dict[str, np.ndarray]]:
    """Calibration and validation rows of one model: labels, inputs, and per prediction (probabilities, MI)."""
    import tensorflow as tf

    meta = artifact.read_metadata(version)
    loaded = tf.saved_model.load(str(version))
    fit = meta.training["fit"]
    train, _ = held_out_rows(meta)  # the test rows are split off and left alone
    fit_rows, validation = split(train, fit["validation_split"], fit["seed"])
    _, calibration = calibration_rows(fit_rows, fit["calibration_split"], fit["validation_split"], fit["seed"])
    out = {}
    for name, rows, seed in (("calibration", calibration, 0), ("validation", validation, 1)):
        draws = signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], rows.x, 100, seed)
        summary = summarize_classification(draws.outputs, draws.predictive)
        det = signatures.infer(loaded.signatures[artifact.SERVING_SIGNATURE], rows.x)
        plain = det if meta.temperature is None else metrics.temper(det, 1 / meta.temperature)
        out[name] = {
            "x": rows.x,
            "y": rows.y,
            "mc": (summary.mean, summary.mutual_information),
            "plain softmax": (plain, np.zeros(len(rows.y))),
            "u": conformal.tie_breaks(rows.x, seed),
        }
    return out


def set_sizes(models: list[dict], score: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per prediction: covered and size of every validation row (all seeds), sets calibrated per seed."""
    scores_of, sets_of = SCORES[score]
    out = {}
    for kind in ("mc", "plain softmax"):
        covered, sizes = [], []
        for m in models:
            cal, val = m["calibration"], m["validation"]
            q = conformal.quantile(np.sort(scores_of(cal[kind][0], cal["y"], cal["u"])), ALPHA)
            members = sets_of(val[kind][0], q, val["u"])
            covered.append(members[np.arange(len(val["y"])), val["y"]])
            sizes.append(members.sum(axis=1))
        out[kind] = (np.concatenate(covered), np.concatenate(sizes).astype(np.float64))
    return out


def abstention(models: list[dict], kind: str, uncertainty: str, delta: float) -> dict[str, float]:
    accepted, wrong, everything = [], [], 0
    for m in models:
        cal, val = m["calibration"], m["validation"]
        correct = cal[kind][0].argmax(-1) == cal["y"]
        threshold = conformal.abstention_threshold(conformal.uncertainty(uncertainty, *cal[kind]), correct, RISK, delta)
        kept = conformal.uncertainty(uncertainty, *val[kind]) <= threshold
        accepted.append(kept)
        wrong.append(kept & (val[kind][0].argmax(-1) != val["y"]))
        everything += threshold == -np.inf
    kept, errors = np.concatenate(accepted), np.concatenate(wrong)
    return {"accepted": kept.mean(), "errors": int(errors.sum()), "rows": int(kept.sum()), "all": everything}


def markdown(models: list[dict], seeds: list[int]) -> str:
    lines = [
        f"Seeds {', '.join(map(str, seeds))}: calibrated on each seed's calibration rows, measured on its "
        f"validation rows ({sum(len(m['validation']['y']) for m in models)} in all). No test row.",
        "",
        f"| sets at alpha {ALPHA} | coverage MC / softmax | mean size MC / softmax | MC - softmax, 90 % interval |",
        "|---|---|---|---|",
    ]
    for score in SCORES:
        result = set_sizes(models, score)
        (mc_cov, mc_size), (plain_cov, plain_size) = result["mc"], result["plain softmax"]
        d = metrics.paired_bootstrap(lambda s, _y: float(np.mean(s)), mc_size, plain_size, np.zeros(len(mc_size)))
        lines.append(
            f"| {score} | {mc_cov.mean():.3f} / {plain_cov.mean():.3f} "
            f"| {mc_size.mean():.3f} / {plain_size.mean():.3f} "
            f"| {d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] |"
        )
    lines += [
        "",
        f"| abstention at risk {RISK} | delta | accepted | errors / accepted | seeds abstaining on all |",
        "|---|---|---|---|---|",
    ]
    candidates = [("mc", u) for u in conformal.UNCERTAINTIES] + [("plain softmax", conformal.UNCERTAINTIES[0])]
    for kind, uncertainty in candidates:
        for delta in DELTAS:
            r = abstention(models, kind, uncertainty, delta)
            lines.append(
                f"| {kind}: {uncertainty} | {delta} | {r['accepted']:.3f} | {r['errors']} / {r['rows']} | {r['all']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="bench/digits_seeds.py's --repository")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: every digits-seed-S model there")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    seeds = args.seeds or sorted(int(p.name.rsplit("-", 1)[1]) for p in args.repository.glob("digits-seed-*"))
    versions = [args.repository / f"digits-seed-{s}" for s in seeds]
    models = [rows_of(v / str(artifact.versions(v)[-1])) for v in versions]
    text = markdown(models, seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"conformal-choice-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
