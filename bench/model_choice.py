"""Which training and which abstention weight: weighed on non-test rows of many seeds, never test rows.

    python bench/model_choice.py --candidate default=DIR --candidate decay=DIR2 [--weights 1 1.5 2 3]

Each ``DIR`` is a ``bench/digits_seeds.py`` repository (``digits-seed-S`` models, the same seeds in
each). Per candidate and per weight ``c`` of the abstention score ``1 - p + c * MI``:

- the served rule's acceptance at risk 1 % (``delta`` as stored), bootstrapped as
  ``bench/conformal_choice.py`` does: 468-row calibration sets drawn from each seed's training-share
  calibration rows and validation rows, measured on those rows;
- abstention on out-of-distribution inputs made for validation, by the rule calibrated on all those
  rows: uniform noise, inverted validation digits, lines and crosses, and rectangular frames that are
  *not* among the 81 boxes the test OOD set draws from (``conformal_report._boxes``);
- per candidate, the served MC predictive's accuracy and NLL on the validation rows (seed 1), the
  confidently wrong ones (p > 0.9), and the NLL difference from the first candidate (paired bootstrap).

docs/conformal.md, "A better model", has the tables this printed and the rules they were read by.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import artifact, conformal, metrics, signatures  # noqa: E402
from training.report import held_out_rows  # noqa: E402
from training.uncertainty import summarize_classification  # noqa: E402

RISK, CALIBRATION_ROWS, RESAMPLES, OOD_ROWS = 0.01, 468, 200, 300
PIXEL_MAX = 16.0


def lines_and_crosses(count: int, seed: int) -> np.ndarray:
    """8 x 8 images of a cross, two vertical bars or a diagonal, at full intensity, flattened."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 8, 8), np.float32)
    for image in images:
        kind, (row, column) = rng.integers(0, 3), rng.integers(1, 7, 2)
        if kind == 0:
            image[row, :] = image[:, column] = PIXEL_MAX
        elif kind == 1:
            image[:, column] = image[:, (column + 3) % 8] = PIXEL_MAX
        else:
            np.fill_diagonal(image if rng.integers(0, 2) else image[:, ::-1], PIXEL_MAX)
    return images.reshape(count, 64)


def is_test_box(top: int, left: int, bottom: int, right: int) -> bool:
    """Whether the frame is one of the 81 the test OOD set draws from (corners in 0..2 and 5..7)."""
    return max(top, left) <= 2 and min(bottom, right) >= 5


def other_frames(count: int, seed: int) -> np.ndarray:
    """Rectangular frames, smaller or off-centre: none of them is a box of the test OOD set."""
    rng = np.random.default_rng(seed)
    images = []
    while len(images) < count:
        top, left = rng.integers(0, 6, 2)
        bottom, right = top + rng.integers(2, 8), left + rng.integers(2, 8)
        if bottom > 7 or right > 7 or is_test_box(top, left, bottom, right):
            continue
        image = np.zeros((8, 8), np.float32)
        image[top : bottom + 1, [left, right]] = PIXEL_MAX
        image[[top, bottom], left : right + 1] = PIXEL_MAX
        images.append(image.reshape(64))
    return np.stack(images)


@dataclass
class Predicted:
    """The served MC predictive of some rows: top probability, mutual information, and (labelled rows) correct."""

    top: np.ndarray
    information: np.ndarray
    correct: np.ndarray | None = None

    def uncertainty(self, weight: float) -> np.ndarray:
        return 1.0 - self.top + weight * self.information


@dataclass
class Seed:
    pool: Predicted  # training-share calibration rows, then validation rows
    ood: dict[str, Predicted]
    validation_nll: np.ndarray
    delta: float


def predicted_seed(version: Path) -> Seed:
    import tensorflow as tf

    meta = artifact.read_metadata(version)
    mc = tf.saved_model.load(str(version)).signatures[artifact.MC_SIGNATURE]
    rows = held_out_rows(meta)
    share = held_out_rows(meta, calibration_from_test=0.0).calibration  # no row of the test share

    def served(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        draws = signatures.mc_draws(mc, x, 100, seed)
        summary = summarize_classification(draws.outputs, draws.predictive)
        return summary.mean, summary.mutual_information

    (p_share, i_share), (p_val, i_val) = served(share.x, 0), served(rows.validation.x, 1)
    low, high = float(rows.train.x.min()), float(rows.train.x.max())
    ood = {
        "noise": np.random.default_rng(4242).uniform(low, high, (OOD_ROWS, 64)).astype(np.float32),
        "inverted": (low + high - rows.validation.x).astype(np.float32),
        "lines and crosses": lines_and_crosses(OOD_ROWS, 4243),
        "other frames": other_frames(OOD_ROWS, 4244),
    }
    labels = np.concatenate([share.y, rows.validation.y])
    probabilities = np.concatenate([p_share, p_val])
    pool = Predicted(probabilities.max(-1), np.concatenate([i_share, i_val]), probabilities.argmax(-1) == labels)
    nll = -np.log(np.maximum(p_val[np.arange(len(p_val)), rows.validation.y], 1e-12))
    predicted_ood = {}
    for name, x in ood.items():
        p, i = served(x, 1)
        predicted_ood[name] = Predicted(p.max(-1), i)
    return Seed(pool, predicted_ood, nll, meta.conformal.delta if meta.conformal else 0.2)


def bootstrap_acceptance(seed: Seed, weight: float, number: int) -> float:
    u, correct = seed.pool.uncertainty(weight), seed.pool.correct
    draws = np.random.default_rng(number).integers(0, len(u), (RESAMPLES, CALIBRATION_ROWS))
    shares = [np.mean(u <= conformal.abstention_threshold(u[i], correct[i], RISK, seed.delta)) for i in draws]
    return float(np.mean(shares))


def ood_abstained(seed: Seed, weight: float) -> dict[str, float]:
    threshold = conformal.abstention_threshold(seed.pool.uncertainty(weight), seed.pool.correct, RISK, seed.delta)
    return {name: float(np.mean(p.uncertainty(weight) > threshold)) for name, p in seed.ood.items()}


def markdown(candidates: dict[str, list[Seed]], weights: list[float]) -> str:
    first = next(iter(candidates.values()))
    families = list(first[0].ood)
    lines = [
        f"{len(first)} seeds: training-share calibration + validation rows, validation OOD inputs. No test row.",
        "",
        "| candidate | validation accuracy / NLL | NLL - first, 90 % interval | confidently wrong |",
        "|---|---|---|---|",
    ]
    reference = np.concatenate([s.validation_nll for s in first])
    for name, seeds in candidates.items():
        nll = np.concatenate([s.validation_nll for s in seeds])
        correct = np.concatenate([s.pool.correct[-len(s.validation_nll) :] for s in seeds])
        top = np.concatenate([s.pool.top[-len(s.validation_nll) :] for s in seeds])
        d = metrics.paired_bootstrap(lambda v, _y: float(np.mean(v)), nll, reference, np.zeros(len(nll)))
        lines.append(
            f"| {name} | {correct.mean():.3f} / {nll.mean():.4f} | {d['difference']:+.4f} "
            f"[{d['low']:+.4f}, {d['high']:+.4f}] | {int(np.sum(~correct & (top > 0.9)))} |"
        )
    lines += [
        "",
        f"| candidate | c | accepted at risk {RISK} (bootstrap) | lowest seed | " + " | ".join(families) + " |",
        "|---|---|---|---|" + "---|" * len(families),
    ]
    for name, seeds in candidates.items():
        for weight in weights:
            accepted = [bootstrap_acceptance(s, weight, n) for n, s in enumerate(seeds)]
            abstained = [ood_abstained(s, weight) for s in seeds]
            shares = " | ".join(f"{np.mean([a[f] for a in abstained]):.3f}" for f in families)
            lines.append(f"| {name} | {weight:g} | {np.mean(accepted):.3f} | {np.min(accepted):.3f} | {shares} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", action="append", required=True, help="NAME=DIR, a digits_seeds repository")
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0], help="weights c of the mutual information")
    args = parser.parse_args(argv)
    candidates = {}
    for given in args.candidate:
        name, _, folder = given.partition("=")
        repository = Path(folder)
        seeds = sorted(int(p.name.rsplit("-", 1)[1]) for p in repository.glob("digits-seed-*"))
        versions = [repository / f"digits-seed-{s}" for s in seeds]
        candidates[name] = [predicted_seed(v / str(artifact.versions(v)[-1])) for v in versions]
    text = markdown(candidates, args.weights)
    print(text)
    return text


if __name__ == "__main__":
    main()
