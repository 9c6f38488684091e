"""Which conformity score, abstention score and delta: weighed on calibration and validation rows, never test rows.

    python bench/conformal_choice.py --repository bench/results/digits-seeds-conformal [--seeds 0 1 …]

For each ``digits-seed-S`` model of a ``bench/digits_seeds.py`` repository: its calibration rows
through ``mc_dropout`` as at export (T = 100, seed 0), its validation rows as a request with a fresh
seed gets them (seed 1), and the plain softmax of both. Sets and abstention rules are calibrated on
the calibration rows and measured on the validation rows, for every candidate, so the choice made in
``training.conformity`` (``SET_SCORE``, ``UNCERTAINTY``, ``DEFAULT_DELTA``) can be re-checked without
scoring a test row.

How many calibration rows (``--calibration-from-test``): the served rule's acceptance at risk 1 % for
calibration sets of each size in ``SIZES``, drawn with replacement from each seed's calibration rows
of the training share and its validation rows (never a row of the test share), beside the chance
that some seed's 90 % sets cover less than 0.84 of the test rows left (binomial arithmetic).
Writes ``conformal-choice-<time>.md`` beside ``bench/digits_seeds.py``'s results.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import artifact, conformal, conformity, metrics, signatures  # noqa: E402
from training.report import held_out_rows  # noqa: E402
from training.uncertainty import summarize_classification  # noqa: E402

ALPHA, RISK = 0.1, 0.01
DELTAS = (0.1, 0.2)
SIZES = (288, 378, 468, 558)
"""Calibration rows: the training share's 288 alone, and with 25, 50 and 75 % of the 360 test-share rows."""
TEST_SHARE, FLOOR, SEEDS_JUDGED, RESAMPLES = 360, 0.84, 20, 200
"""Test-share rows, per-seed coverage floor of the goal, seeds it is judged on, calibration sets drawn per size."""
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
    rows = held_out_rows(meta)  # the test rows are split off and left alone
    calibration, validation = rows.calibration, rows.validation
    training_share = held_out_rows(meta, calibration_from_test=0.0).calibration  # no row of the test share
    out = {}
    parts = (("calibration", calibration, 0), ("validation", validation, 1), ("training share", training_share, 0))
    for name, rows, seed in parts:
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


def acceptance_by_size(models: list[dict]) -> dict[int, np.ndarray]:
    """Per size, each seed's mean share accepted by the served rule at ``RISK`` (delta 0.2) over ``RESAMPLES``
    calibration sets of that size drawn with replacement from its training-share calibration and validation
    rows, measured on those rows (a bootstrap: no row of the test share)."""
    name = conformity.UNCERTAINTY
    out: dict[int, list[float]] = {n: [] for n in SIZES}
    for seed, m in enumerate(models):
        parts = (m["training share"], m["validation"])
        u = np.concatenate([conformal.uncertainty(name, *part["mc"]) for part in parts])
        correct = np.concatenate([part["mc"][0].argmax(-1) == part["y"] for part in parts])
        for n in SIZES:
            draws = np.random.default_rng(seed).integers(0, len(u), (RESAMPLES, n))
            shares = [np.mean(u <= conformal.abstention_threshold(u[i], correct[i], RISK, 0.2)) for i in draws]
            out[n].append(float(np.mean(shares)))
    return {n: np.array(shares) for n, shares in out.items()}


def floor_risk(calibration: int, test: int) -> float:
    """Chance that at least one of ``SEEDS_JUDGED`` seeds' 90 % sets cover less than ``FLOOR`` of its ``test`` rows.

    Given the calibration draw a split-conformal set covers a fresh row with probability C ~ Beta(r, n + 1 - r),
    r = ⌈(n + 1)(1 - alpha)⌉ (continuous scores); the test rows covered are then Binomial(test, C).
    """
    r = math.ceil((calibration + 1) * (1 - ALPHA) - 1e-9)
    c = np.linspace(0.0005, 0.9995, 2000)
    weight = stats.beta.pdf(c, r, calibration + 1 - r)
    below = stats.binom.cdf(math.ceil(FLOOR * test - 1e-9) - 1, test, c)
    one = float((weight * below).sum() / weight.sum())
    return 1 - (1 - one) ** SEEDS_JUDGED


def size_markdown(models: list[dict]) -> list[str]:
    accepted = acceptance_by_size(models)
    lines = [
        "",
        f"| calibration rows | test rows left | accepted at risk {RISK} (bootstrap) | lowest seed "
        f"| chance a seed of {SEEDS_JUDGED} covers < {FLOOR} |",
        "|---|---|---|---|---|",
    ]
    for n, shares in accepted.items():
        test = TEST_SHARE - (n - SIZES[0])
        lines.append(f"| {n} | {test} | {shares.mean():.3f} | {shares.min():.3f} | {floor_risk(n, test):.2f} |")
    return lines


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
    return "\n".join(lines + size_markdown(models)) + "\n"


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
