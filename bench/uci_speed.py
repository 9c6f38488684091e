"""Where the UCI protocol's training time goes, and the stacked trainer with and without shared draws.

    python bench/uci_speed.py [--data-dir ../shared/datasets/uci/bostonHousing] [--epochs 40]

Builds the grid-search networks of every split of one data set (p x tau, 240 for Boston) exactly as
``python -m training uci`` does, then, side by side in one process:

1. the draws alone (``epoch_draw``: shuffle keys and dropout noise) for one key per network, and for
   one key per (split, p) as the protocol now uses;
2. ``train_networks`` for ``--epochs`` epochs: the trainer as it was before this change (read from
   git, commit ``9d1df28``: per-network draws with the sort inside the loop, one XLA cluster per
   step), today's trainer with one key per network, and today's with the shared keys; wall and CPU
   time (the machine may be shared; CPU time is steadier).

Prints a table and ratios; the full protocol's phases are timed by ``python -m training uci`` itself
(``timings`` in its JSON).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tensorflow as tf  # noqa: E402

from training import uci  # noqa: E402
from training.uci.trainer import epoch_draw  # noqa: E402


def grid_networks(data: uci.UciDataset):
    """Standardized rows, rates, decays and both key schemes of the grid-search networks."""
    xs, ys, rates, decays, own, shared = [], [], [], [], [], []
    for k, (train, _) in enumerate(data.splits):
        fit = train[: int(len(train) * (1 - uci.VALIDATION_FRACTION))]
        scaling = uci.Standardization.fit(data.x[fit], data.y[fit])
        for i, p in enumerate(data.dropout_rates):
            for j, tau in enumerate(data.tau_values):
                xs.append(scaling.inputs(data.x[fit]))
                ys.append(scaling.target(data.y[fit]))
                rates.append(p)
                decays.append(uci.weight_decay(p, tau, len(fit), data.n_hidden))
                own.append(uci.network_key(0, 0, k, i * len(data.tau_values) + j))
                shared.append(uci.network_key(0, 0, k, i))
    arrays = (np.stack(xs), np.stack(ys), np.array(rates), np.array(decays))
    return arrays, np.stack(own), np.stack(shared)


BEFORE = "9d1df28"
"""The last commit with the previous trainer (``training/uci.py``)."""


def previous_trainer():
    """``training/uci.py`` as of ``BEFORE``, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:training/uci.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "uci_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("uci_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["uci_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/datasets/uci/bostonHousing")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    data = uci.load_dataset(args.data_dir)
    (x, y, rates, decays), own, shared = grid_networks(data)
    g, n, d = x.shape
    width = d + data.n_hidden
    distinct = len(np.unique(shared, axis=0))
    print(f"{data.name}: {g} grid networks x {n} rows, {args.epochs} epochs, {distinct} shared keys")

    def draws(keys: np.ndarray):
        fn = tf.function(lambda k, e: epoch_draw(k, e, n, width))
        keys = tf.constant(np.unique(keys, axis=0))
        fn(keys, tf.constant(0, tf.int64))  # trace
        return lambda: [fn(keys, tf.constant(e, tf.int64)) for e in range(args.epochs)]

    def train(keys: np.ndarray, epochs: int, module=uci):
        return lambda: module.train_networks(x, y, rates, decays, keys, epochs, hidden=data.n_hidden)

    before = previous_trainer()
    train(own, 1, before)()  # trace all three (the number of distinct keys is part of the traced shapes)
    train(own, 1)()
    train(shared, 1)()
    rows = {
        "draws, one key per network": timed(draws(own)),
        "draws, one key per (split, p)": timed(draws(shared)),
        "training, previous trainer": timed(train(own, args.epochs, before)),
        "training, one key per network": timed(train(own, args.epochs)),
        "training, shared keys (now)": timed(train(shared, args.epochs)),
    }
    print(f"{'':42}{'wall s':>10}{'CPU s':>10}{'CPU ms/epoch':>14}")
    for name, (wall, cpu) in rows.items():
        print(f"{name:42}{wall:>10.2f}{cpu:>10.2f}{1000 * cpu / args.epochs:>14.1f}")
    now = rows["training, shared keys (now)"]
    for name in ("training, previous trainer", "training, one key per network"):
        then, label = rows[name], name.removeprefix("training, ")
        print(f"now against {label}: wall {then[0] / now[0]:.2f}x, CPU {then[1] / now[1]:.2f}x")


if __name__ == "__main__":
    main()
