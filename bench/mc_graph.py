"""The MC graph of this checkout against another commit's, in one process: the same bits, and the CPU it costs.

    python bench/mc_graph.py --before f6a5feb

Builds ``mc_dropout`` and ``mc_dropout_segments`` (``training/mc_dropout.py``) from both checkouts on
the same classic digits network (Dense 128 → Dropout 0.5 → Dense 64 → Dropout 0.5 → Dense 10,
random weights: the cost does not depend on them), checks that both give the same samples bit for
bit, and times one call of 32 instances x T = 100 with one seed and as 32 segments of their own
seeds (what MC batching runs). Time is process CPU (every thread), the best of a few batches, one
TensorFlow thread as the server runs it: on a shared machine CPU time moves far less than wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.in_process import best_of  # noqa: E402


def _checkout_training(commit: str, into: Path) -> str:
    """``training/`` of ``commit`` as the importable package ``training_<short hash>``, imports renamed."""
    git = partial(subprocess.run, cwd=ROOT, capture_output=True, check=True)
    short_hash = git(["git", "rev-parse", "--short", commit], text=True).stdout.strip()
    package = f"training_{short_hash}"  # a ref such as HEAD~1 is no module name
    archive = git(["git", "archive", commit, "training"])
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "training").rename(into / package)
    for source in (into / package).glob("*.py"):
        text = source.read_text()
        source.write_text(
            text.replace("from training.", f"from {package}.").replace("from training import", f"from {package} import")
        )
    return package


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import importlib

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from training.model import ModelConfig, build_network, with_preprocessing

    scratch = Path(tempfile.mkdtemp())
    sys.path.insert(0, str(scratch))
    modules = {"before": importlib.import_module(f"{_checkout_training(args.before, scratch)}.mc_dropout")}
    modules["this checkout"] = importlib.import_module("training.mc_dropout")
    network = build_network(ModelConfig(), (64,), 10, "classification")
    model = with_preprocessing(network, np.zeros(64, np.float32), np.ones(64, np.float32))
    rows = tf.constant(np.random.default_rng(0).uniform(0, 16, (32, 64)).astype(np.float32))
    segments = (rows, tf.range(32), tf.range(32, dtype=tf.int64), tf.zeros([32], tf.int32), tf.fill([32], 100))
    one_seed = (rows, tf.constant(100), tf.constant(1, tf.int64))
    calls = {}
    for name, module in modules.items():
        alone = tf.function(module.mc_dropout_fn(model, 2**15), autograph=False)
        batched = tf.function(module.mc_dropout_segments_fn(model, 2**15), autograph=False)
        calls[name] = (lambda f=alone: f(*one_seed), lambda f=batched: f(*segments))
    answers = {name: [call().numpy() for call in pair] for name, pair in calls.items()}
    same = all(np.array_equal(a, b) for a, b in zip(*answers.values(), strict=True))
    print(f"samples equal bit for bit: {same}")
    cpu_ms = partial(best_of, repeat=5, number=30, clock=time.process_time)
    for round_ in range(args.rounds):
        for name, (alone, batched) in calls.items():
            timed = f"one seed {cpu_ms(alone):.2f} ms  32 segments {cpu_ms(batched):.2f} ms"
            print(f"round {round_ + 1}  {name:14s} {timed}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
