"""One full Boston Housing run of the UCI protocol, and the vectorised trainer against Keras ``fit``.

    python bench/uci_boston.py [--data-dir ../shared/datasets/uci/bostonHousing] [--fit-networks 3]

Part 1 runs ``training.uci.run`` as ``python -m training uci`` does (20 splits, 10x epochs,
T = 10,000) and prints its wall time by phase: grid search (240 networks trained stacked), validation
MC, retrain (20 networks), export + test MC through the SavedModels.
Part 2, in the same process right after, trains a few of the same grid-search networks (split 0,
same rows, p, λ, epochs, batch size) one at a time with Keras ``fit``, the way the paper's code does,
and compares the time per network with the vectorised trainer's. Wall and CPU time are both given:
the machine may be shared, and CPU time is less sensitive to what else runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import uci  # noqa: E402


def keras_fit_per_network(data: uci.UciDataset, epochs: int, count: int) -> tuple[float, float]:
    """Seconds (wall, CPU) to train one split-0 grid-search network with Keras ``fit``, averaged over ``count``."""
    import keras

    from training.model import ModelConfig, build_network

    train = data.splits[0][0]
    fit = train[: int(len(train) * (1 - uci.VALIDATION_FRACTION))]
    scaling = uci.Standardization.fit(data.x[fit], data.y[fit])
    x, y = scaling.inputs(data.x[fit]), scaling.target(data.y[fit])
    grid = [(p, tau) for p in data.dropout_rates for tau in data.tau_values]
    keras.utils.set_random_seed(0)
    wall = cpu = 0.0
    for p, tau in grid[:: max(1, len(grid) // count)][:count]:
        decay = uci.weight_decay(p, tau, len(fit), data.n_hidden)
        config = ModelConfig(hidden=(data.n_hidden,), dropout=p, input_dropout=p, weight_decay=decay)
        started, cpu_started = time.perf_counter(), time.process_time()
        model = build_network(config, (data.x.shape[1],), 1, "regression")
        model.fit(x, y, batch_size=uci.BATCH_SIZE, epochs=epochs, shuffle=True, verbose=0)
        wall += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        print(f"  keras fit p={p:g} tau={tau:g}: {time.perf_counter() - started:.1f} s", flush=True)
    return wall / count, cpu / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets" / "uci" / "bostonHousing")
    parser.add_argument("--epochs-multiplier", type=int, default=10)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--fit-networks", type=int, default=3, help="networks timed with Keras fit")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "uci_boston.json")
    args = parser.parse_args()

    data = uci.load_dataset(args.data_dir)
    with tempfile.TemporaryDirectory() as repository:
        cpu_started = time.process_time()
        result = uci.run(data, epochs_multiplier=args.epochs_multiplier, samples=args.samples, repository=repository)
        protocol_cpu = time.process_time() - cpu_started
    t = result["timings"]
    grid_networks = sum(len(r["grid"]) for r in result["splits"])
    finals = len(result["splits"])
    epochs = result["protocol"]["epochs"]

    print(f"\nKeras fit, {args.fit_networks} grid-search networks of split 0, one at a time, {epochs} epochs each")
    fit_wall, fit_cpu = keras_fit_per_network(data, epochs, args.fit_networks)
    stacked_wall = t["grid_search_s"] / grid_networks
    ratio = fit_wall / stacked_wall
    fit_total = fit_wall * (grid_networks + finals)  # retrain networks have 25 % more rows: a lower bound

    s = result["summary"]
    print(f"\n{data.name}: {finals} splits, {epochs} epochs, T = {args.samples:,}, {result['machine']['cpus']} CPUs")
    print(f"  wall time                      {t['total_s']:8.1f} s   (CPU {protocol_cpu:.0f} s)")
    print(f"  grid search, {grid_networks} networks     {t['grid_search_s']:8.1f} s")
    print(f"  validation MC                  {t['validation_mc_s']:8.1f} s")
    print(f"  retrain, {finals} networks         {t['retrain_s']:8.1f} s")
    print(f"  export + test MC (SavedModel)  {t['export_and_test_mc_s']:8.1f} s")
    rmse, ll = s["rmse_mc"], s["ll"]
    print(f"  rmse {rmse['mean']:.2f} ± {rmse['standard_error']:.2f}, ll {ll['mean']:.2f} ± {ll['standard_error']:.2f}")
    print("\ntraining time per grid-search network")
    print(f"  vectorised (stacked)           {stacked_wall:8.3f} s")
    print(f"  Keras fit, one at a time       {fit_wall:8.3f} s   (CPU {fit_cpu:.2f} s)")
    print(f"  ratio                          {ratio:8.1f}x")
    vectorised_total = t["grid_search_s"] + t["retrain_s"]
    print(f"  all {grid_networks + finals} networks: Keras fit ~{fit_total / 60:.0f} min, ", end="")
    print(f"vectorised {vectorised_total / 60:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bench = {
        "protocol": result["protocol"],
        "timings": t,
        "protocol_cpu_s": protocol_cpu,
        "summary": s,
        "per_network_s": {"vectorised": stacked_wall, "keras_fit": fit_wall, "keras_fit_cpu": fit_cpu},
        "fit_networks_timed": args.fit_networks,
        "ratio": ratio,
        "machine": result["machine"],
    }
    args.out.write_text(json.dumps(bench, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
