"""Adaptive T (``samples: "auto"``) against a long fixed run, in-process on the digits model.

    python bench/adaptive.py                 # the trained digits model in ./artifacts

The server's ``auto`` is ``training.adaptive.Adaptive`` driving ``mc_dropout_segments`` calls; this
script runs exactly that, without HTTP, on every held-out test digit and compares each answer with
a T = 2,000 reference of the same rows (another seed): whether the label agrees, whether the top
probability is within twice the tolerance, how many samples it used. It also shows how the default
tolerance was chosen, on the validation rows (never the test rows), and T on the mixed stream the
serving benchmark sends (test digits plus 10 % boxes, noise images and inverted digits).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import adaptive, artifact, signatures  # noqa: E402
from training.data import digits, split  # noqa: E402

TOLERANCES = (0.02, 0.03, 0.04, 0.05, 0.06)
"""The grid the default tolerance was chosen from (the smallest with a mean T within 30 on validation rows)."""
REFERENCE_SAMPLES = 2000
REQUEST_SIZES = (1, 32)
"""Instances per request of the mixed stream, as bench/serving.py sends it (mc-auto-mixed, mc-auto-mixed-32)."""


def held_out(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The digits model's validation and test rows (``python -m training``'s default splits)."""
    train_rows, test = split(digits(), 0.2, seed)
    _, validation = split(train_rows, 0.1, seed)
    return validation.x.astype(np.float32), test.x.astype(np.float32)


def out_of_distribution(count: int, digits_x: np.ndarray, seed: int = 0) -> np.ndarray:
    """``count`` inputs no digit looks like, in equal parts: white boxes, uniform noise, inverted digits."""
    rng = np.random.default_rng(seed)
    boxes = np.zeros((count, 8, 8), np.float32)
    for box in boxes:
        top, left = rng.integers(0, 4, 2)
        box[top : top + rng.integers(3, 5), left : left + rng.integers(3, 5)] = 16
    noise = rng.uniform(0, 16, (count, 64)).astype(np.float32)
    inverted = 16 - digits_x[rng.integers(0, len(digits_x), count)]
    kinds = np.stack([boxes.reshape(count, 64), noise, inverted])  # [3, count, 64]
    return kinds[np.arange(count) % 3, np.arange(count)]


def mixed_stream(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every test digit plus 10 % out-of-distribution inputs, shuffled; and which rows are the latter."""
    _, test = held_out()
    strange = out_of_distribution(round(len(test) / 9), test, seed)
    rows = np.concatenate([test, strange])
    order = np.random.default_rng(seed).permutation(len(rows))
    return rows[order], order >= len(test)


def run_auto(segments, inputs: np.ndarray, seed: int, tolerance: float, temperature: float | None, maximum: int):
    """Each row's T and served probabilities under ``auto`` (what the server answers)."""
    error = adaptive.error_function("classification", None, temperature)
    used, served = np.zeros(len(inputs), int), np.zeros((len(inputs), 10))
    for rows, draws in adaptive.Adaptive(inputs, seed, error, tolerance, maximum).run(segments):
        used[rows] = draws.outputs.shape[0]
        served[rows] = _served(draws.outputs, temperature)
    return used, served


def rounds(segments, inputs: np.ndarray, seed: int, per_request: int, temperature: float | None, maximum: int):
    """Each request's stretches (graph calls, if it ran alone) when ``inputs`` are sent ``per_request`` at a time:
    a request waits for its slowest instance, so its rounds are the most any of its instances takes alone."""
    error = adaptive.error_function("classification", None, temperature)
    counts = []
    for start in range(0, len(inputs), per_request):
        calls = 0

        def counted(stretches):
            nonlocal calls
            calls += 1
            return segments(stretches)

        adaptive.Adaptive(inputs[start : start + per_request], seed, error, adaptive.DEFAULT_TOLERANCE, maximum).run(
            counted
        )
        counts.append(calls)
    return np.array(counts)


def _served(outputs: np.ndarray, temperature: float | None) -> np.ndarray:
    if temperature is None:
        return outputs.astype(np.float64).mean(axis=0)
    return signatures.calibrated_predictive(outputs, temperature)


def compare(loaded, inputs: np.ndarray, tolerance: float, temperature: float | None, seeds, maximum: int) -> dict:
    """Auto against the T = 2,000 reference, over ``seeds``: agreement shares and T, pooled over seeds."""
    reference = signatures.mc_draws(loaded.signatures[artifact.MC_SIGNATURE], inputs, REFERENCE_SAMPLES, 2**40)
    expected = _served(reference.outputs, temperature)
    segments = partial(signatures.segment_draws, loaded.signatures[artifact.MC_SEGMENTS_SIGNATURE])
    agree, within, used = [], [], []
    for seed in seeds:
        t, served = run_auto(segments, inputs, seed, tolerance, temperature, maximum)
        label = served.argmax(axis=-1)
        agree.append(label == expected.argmax(axis=-1))
        within.append(np.abs(served.max(axis=-1) - expected[np.arange(len(inputs)), label]) <= 2 * tolerance)
        used.append(t)
    used = np.concatenate(used)
    return {
        "tolerance": tolerance,
        "rows": len(inputs),
        "seeds": len(seeds),
        "label_agreement": float(np.mean(agree)),
        "top_within_2_tolerance": float(np.mean(within)),
        "mean_samples": float(used.mean()),
        "median_samples": float(np.median(used)),
        "p90_samples": float(np.percentile(used, 90)),
        "max_samples": int(used.max()),
    }


def measure(version_dir: Path, seeds=(1, 2, 3), maximum: int = adaptive.DEFAULT_MAXIMUM) -> dict:
    """The default tolerance on the test digits, the validation sweep, and T on the mixed stream."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version_dir))
    temperature = artifact.read_metadata(version_dir).predictive_temperature
    validation, test = held_out()
    rows, strange = mixed_stream()
    mixed = compare(loaded, rows, adaptive.DEFAULT_TOLERANCE, temperature, seeds, maximum)
    strange_only = compare(loaded, rows[strange], adaptive.DEFAULT_TOLERANCE, temperature, seeds, maximum)
    segments = partial(signatures.segment_draws, loaded.signatures[artifact.MC_SEGMENTS_SIGNATURE])
    per_request = {
        size: float(np.mean([rounds(segments, rows, seed, size, temperature, maximum) for seed in seeds]))
        for size in REQUEST_SIZES
    }
    return {
        "mixed_stream_rounds": per_request,
        "maximum": maximum,
        "test": compare(loaded, test, adaptive.DEFAULT_TOLERANCE, temperature, seeds, maximum),
        "validation_sweep": [compare(loaded, validation, t, temperature, seeds, maximum) for t in TOLERANCES],
        "mixed_stream": mixed,
        "out_of_distribution": strange_only,
    }


GOALS = [
    ("label agrees with T = 2,000", "label_agreement", ">= 0.99"),
    ("top probability within 2x the tolerance", "top_within_2_tolerance", ">= 0.95"),
    ("mean T", "mean_samples", "<= 30"),
]


def report(results: dict) -> str:
    test = results["test"]
    lines = [
        f"auto, default tolerance {test['tolerance']}, maximum {results['maximum']}: {test['rows']} test digits x "
        f"{test['seeds']} seeds against T = {REFERENCE_SAMPLES:,}\n",
        "| figure | value | target | met |",
        "|---|---:|---|---|",
    ]
    for name, key, target in GOALS:
        value, (op, bound) = test[key], target.split()
        met = value >= float(bound) if op == ">=" else value <= float(bound)
        lines.append(f"| {name} | {value:.4f} | {target} | {'yes' if met else '**no**'} |")
    lines += [
        "\nT per row: test digits, the mixed stream, its out-of-distribution rows alone\n",
        "| rows | mean | median | 90th percentile | max |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("test", "mixed_stream", "out_of_distribution"):
        r = results[name]
        lines.append(
            f"| {name} ({r['rows']}) | {r['mean_samples']:.1f} | {r['median_samples']:.0f} | "
            f"{r['p90_samples']:.0f} | {r['max_samples']} |"
        )
    rounds = ", ".join(f"{size}: {mean:.2f}" for size, mean in results["mixed_stream_rounds"].items())
    lines.append(f"\nstretches per request of the mixed stream, by instances per request: {rounds}")
    lines += [
        "\nchoosing the default on the validation rows\n",
        "| tolerance | mean T | label agreement | top within 2x tolerance |",
        "|---:|---:|---:|---:|",
    ]
    for r in results["validation_sweep"]:
        lines.append(
            f"| {r['tolerance']} | {r['mean_samples']:.1f} | {r['label_agreement']:.4f} | "
            f"{r['top_within_2_tolerance']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--model", default="digits")
    args = parser.parse_args(argv)
    versions = artifact.versions(args.model_dir / args.model)
    if not versions:
        raise SystemExit(f"no {args.model} model in {args.model_dir}: run `python -m training --if-missing` first")
    print(report(measure(args.model_dir / args.model / str(versions[-1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
