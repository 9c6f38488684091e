"""Command line: ``python -m training [train options]``; ``python -m training --help`` lists them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training import artifact
from training.data import DIGITS, DataError

COMMANDS = ("train", "import", "evaluate", "uci")


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model and publish it as the next version (the default)")
    p.add_argument("--data", type=Path, help="CSV or .npz file (default: scikit-learn's digits, embedded)")
    p.add_argument("--target", help="CSV label column")
    p.add_argument("--task", choices=["classification", "regression"], help="default: inferred from the labels")
    p.add_argument("--name", help="model name in the repository (default: the data set's name)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="model repository (default: ./artifacts)")
    p.add_argument("--if-missing", action="store_true", help="do nothing if the model already has a version")
    p.add_argument("--architecture", choices=["dense", "conv"], default="dense")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden layer sizes (classification 128 64, regression 50)")
    p.add_argument(
        "--dropout",
        type=_rate,
        help="dropout rate after each hidden layer (0.5; regression 0.05), or 'concrete': learned rates (start 0.1)",
    )
    p.add_argument("--input-dropout", type=float, help="dropout rate on the inputs (0; regression: --dropout)")
    p.add_argument("--spatial-dropout", type=float, default=0.25, help="SpatialDropout2D rate (conv)")
    p.add_argument(
        "--weight-decay", type=float, help="L2 factor on every kernel (classification 1e-4; regression: from tau)"
    )
    p.add_argument("--tau", type=float, help="regression model precision (default: fitted on validation rows)")
    p.add_argument(
        "--likelihood",
        choices=["homoscedastic", "heteroscedastic"],
        default="homoscedastic",
        help="regression: one noise level tau, or a predicted variance per instance (Kendall & Gal 2017)",
    )
    p.add_argument("--beta", type=float, default=0.5, help="heteroscedastic: β of the β-NLL (0 = plain NLL; 0.5)")
    p.add_argument("--epochs", type=int, help="training epochs (classification 300, regression 400)")
    p.add_argument("--batch-size", type=int, help="(classification 32, regression 128)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--validation-split", type=float, default=0.1)
    p.add_argument("--test-split", type=float, default=0.2)
    p.add_argument(
        "--calibration-split",
        type=float,
        default=0.2,
        help="share of the training rows held out for conformal prediction sets, intervals and abstention "
        "(0: none; default 0.2)",
    )
    p.add_argument(
        "--calibration-from-test",
        type=float,
        default=0.5,
        help="share of the test rows that become calibration rows too: more rows to certify an abstention "
        "risk with, at no cost to the model (0: the test rows stay whole; default 0.5)",
    )
    p.add_argument(
        "--risk", type=float, default=0.05, help="classifiers: abstention risk served when a request names none (0.05)"
    )
    p.add_argument("--mc-samples", type=int, default=100, help="MC samples for the held-out scores")
    p.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="classifiers: fit temperatures on the validation rows and apply them in the signatures (default: on)",
    )
    p.add_argument(
        "--outlier-weight",
        type=float,
        default=0.5,
        help="classifiers: weight of the term that makes MC samples disagree on synthetic outliers "
        "(pixel-permuted training rows; training/outliers.py); 0 turns it off (default: 0.5)",
    )
    p.add_argument(
        "--shift-augment",
        action="store_true",
        help="image classifiers: train on rows shifted by up to one pixel each way, fresh at every step (default: off)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_train)
    return p


def _rate(text: str) -> float | str:
    if text == "concrete":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate or 'concrete', got {text!r}") from None


def _weight_decay(given: float | None, regression: bool, concrete: bool) -> float:
    """The L2 factor: a classifier's default is ``CLASSIFIER_WEIGHT_DECAY``; 0 lets a regression network take
    Gal's prior from tau (``training.train``) and leaves Concrete Dropout to its own regularizers."""
    from training.model import CLASSIFIER_WEIGHT_DECAY

    if given is not None:
        return given
    return 0.0 if regression or concrete else CLASSIFIER_WEIGHT_DECAY


def _run_train(args: argparse.Namespace) -> None:
    from training import data as datasets

    dataset = (
        datasets.digits(args.architecture == "conv")
        if args.data is None
        else datasets.load(args.data, args.target, args.task)
    )
    name = artifact.validate_name(args.name or dataset.name)
    existing = artifact.versions(args.artifacts / name)
    if args.if_missing and existing:
        print(f"{name}: version {existing[-1]} exists in {args.artifacts}; not training (--if-missing)")
        return

    from training.concrete import INITIAL_RATE
    from training.conformity import CalibrationRows
    from training.export import export_model
    from training.model import ModelConfig
    from training.train import TrainConfig, train

    regression = dataset.task == "regression"
    concrete = args.dropout == "concrete"
    dropout = INITIAL_RATE if concrete else args.dropout if args.dropout is not None else (0.05 if regression else 0.5)
    config = ModelConfig(
        architecture=args.architecture,
        hidden=tuple(args.hidden or ((50,) if regression else (128, 64))),
        dropout=dropout,
        input_dropout=args.input_dropout if args.input_dropout is not None else (dropout if regression else 0.0),
        spatial_dropout=args.spatial_dropout,
        weight_decay=_weight_decay(args.weight_decay, regression, concrete),
        learning_rate=args.learning_rate,
        concrete=concrete,
    )
    settings = TrainConfig(
        epochs=args.epochs or (400 if regression else 300),
        batch_size=args.batch_size or (128 if regression else 32),
        validation_split=args.validation_split,
        test_split=args.test_split,
        calibration_split=args.calibration_split,
        calibration_from_test=args.calibration_from_test,
        seed=args.seed,
        tau=args.tau,
        mc_samples=args.mc_samples,
        calibrate=args.calibrate,
        outlier_weight=args.outlier_weight,
        shift_augment=args.shift_augment,
        likelihood=args.likelihood,
        beta=args.beta,
    )
    print(f"{name}: {dataset.task}, {len(dataset.y)} rows, inputs {list(dataset.x.shape[1:])}", flush=True)
    trained = train(dataset, config, settings)
    path = export_model(
        trained.model,
        args.artifacts,
        name,
        task=dataset.task,
        class_labels=dataset.class_labels,
        feature_names=dataset.feature_names,
        target_names=dataset.target_names,
        tau=trained.tau,
        likelihood=args.likelihood if regression else "homoscedastic",
        temperature=trained.temperature,
        predictive_temperature=trained.predictive_temperature,
        preprocessing=trained.preprocessing,
        metrics=trained.metrics,
        training={
            "model": config.__dict__,
            "fit": settings.__dict__,
            "data": str(args.data) if args.data else DIGITS,
            "target": args.target,
        },
        history=trained.history,
        calibration=None
        if trained.calibration is None
        else CalibrationRows(
            trained.calibration.x,
            trained.calibration.y,
            source=f"held out: {args.calibration_split:.0%} of the training rows and "
            f"{args.calibration_from_test:.0%} of the test rows, seed {args.seed}",
            default_risk=args.risk,
        ),
    )
    _print_summary(trained.metrics, trained.tau, trained.temperature, trained.predictive_temperature)
    print(f"published {path}")


def _print_summary(
    scores: dict[str, dict[str, float]],
    tau: float | None,
    temperature: float | None,
    predictive_temperature: float | None,
) -> None:
    names = list(next(iter(scores.values())))
    note = f" (tau = {tau:.4g})" if tau else ""
    if temperature is not None:
        note = (
            f" (temperature {temperature:.3f}, MC predictive temperature {predictive_temperature:.3f},"
            " fitted on validation rows)"
        )
    print("\nheld-out test set" + note)
    print(f"{'':32}" + "".join(f"{n:>16}" for n in names))
    for kind, values in scores.items():
        print(f"{kind:32}" + "".join(f"{values[n]:>16.4f}" for n in names))


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a classifier's uncertainty: calibration, OOD detection, plots")
    p.add_argument("name", help="model name in the repository")
    p.add_argument("--version", type=int, help="default: the latest")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="model repository (default: ./artifacts)")
    p.add_argument("--samples", type=int, default=100, help="MC samples T")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="report folder (default: reports/<name>/<version>)")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from training.report import evaluate, markdown

    versions = artifact.versions(args.artifacts / artifact.validate_name(args.name))
    if not versions or (args.version is not None and args.version not in versions):
        raise ValueError(f"{args.artifacts / args.name}: no version {args.version or ''} (found: {versions or 'none'})")
    version = args.version or versions[-1]
    out = args.out or Path("reports") / args.name / str(version)
    report = evaluate(args.artifacts / args.name / str(version), out, args.samples, args.seed)
    print(markdown(report))
    print(f"report and plots in {out}")


def _import_parser(sub) -> None:
    p = sub.add_parser(
        "import",
        help="publish your own trained Keras model (.keras) with MC dropout",
        description="Check a trained Keras model and publish it as the next version, with the mc_dropout "
        "signature over its dropout layers and, given calibration rows it was not trained on, its calibration.",
    )
    p.add_argument("path", type=Path, help="the model: a .keras file (or a legacy .h5)")
    p.add_argument("--name", help="model name in the repository (default: the file's name)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="model repository (default: ./artifacts)")
    p.add_argument(
        "--task", choices=["classification", "regression"], help="default: classification if it outputs probabilities"
    )
    p.add_argument("--class-labels", nargs="+", help="names of the classifier's outputs, in order (default: 0..K-1)")
    p.add_argument(
        "--logits",
        action="store_true",
        help="the classifier outputs logits: softmax is applied inside both signatures",
    )
    p.add_argument(
        "--calibration-data",
        type=Path,
        help="CSV or .npz rows the model was not trained on: fits the temperatures (classification) or tau "
        "(regression); labels are output indices unless --class-labels names them",
    )
    p.add_argument("--target", help="CSV label column of --calibration-data")
    p.add_argument(
        "--custom-objects",
        metavar="MODULE",
        help="module (or .py file) defining the model's custom layers; its CUSTOM_OBJECTS dict if it has one",
    )
    p.add_argument("--mc-samples", type=int, default=100, help="MC samples for fitting the calibration (default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_import)


def _run_import(args: argparse.Namespace) -> None:
    from training.importer import import_model

    name = artifact.validate_name(args.name or args.path.stem)
    imported = import_model(
        args.path,
        args.artifacts,
        name,
        task=args.task,
        class_labels=args.class_labels,
        calibration_data=args.calibration_data,
        target=args.target,
        logits=args.logits,
        custom_objects=args.custom_objects,
        samples=args.mc_samples,
        seed=args.seed,
    )
    meta = artifact.read_metadata(imported.path)
    layers = ", ".join(f"{d.type} {d.rate:g}" for d in meta.dropout_layers) or "none"
    print(f"{name}: {meta.task}, inputs {meta.input_shape}, outputs {meta.output_shape} ({meta.output_meaning})")
    print(f"dropout layers: {layers}")
    fitted = imported.calibration
    if fitted.tau is not None:
        print(f"tau = {fitted.tau:.4g}, fitted on the calibration rows")
    if fitted.temperature is not None:
        mc = "" if fitted.predictive_temperature is None else f", MC predictive {fitted.predictive_temperature:.3f}"
        print(f"temperature {fitted.temperature:.3f}{mc}, fitted on the calibration rows")
    for kind, values in meta.metrics.items():
        print(f"{kind}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    for note in imported.notes:
        print(f"note: {note}")
    print(f"published {imported.path}")


def _uci_parser(sub) -> None:
    p = sub.add_parser("uci", help="Gal & Ghahramani's UCI regression benchmark through our export path")
    p.add_argument("--data-dir", type=Path, nargs="+", required=True, help="data set folder(s), or folders of them")
    p.add_argument("--splits", type=int, nargs="+", help="split numbers (default: all)")
    p.add_argument(
        "--epochs-multiplier", type=int, default=100, help="epochs = n_epochs.txt x this (default: 100, as published)"
    )
    p.add_argument(
        "--likelihood",
        choices=["homoscedastic", "heteroscedastic"],
        default="homoscedastic",
        help="one noise level tau (the paper's; grid p x tau) or a predicted variance per instance (grid p)",
    )
    p.add_argument(
        "--dropout",
        choices=["grid", "concrete"],
        default="grid",
        help="grid: the paper's fixed rate, chosen from dropout_rates.txt; concrete: each layer learns its rate "
        "(Concrete Dropout, start 0.1), so p is no grid axis (homoscedastic: grid tau; heteroscedastic: none)",
    )
    p.add_argument(
        "--concrete-scale",
        type=float,
        nargs="+",
        default=[1.0],
        help="concrete: factor(s) s on both regularizers (s l²/N, s 2/N); several make a grid axis (default: 1)",
    )
    p.add_argument("--beta", type=float, default=0.5, help="heteroscedastic: β of the β-NLL (0 = plain NLL; 0.5)")
    p.add_argument("--samples", type=int, default=10_000, help="MC samples T, validation and test (default: 10000)")
    p.add_argument("--out", type=Path, default=Path("bench/results/uci"), help="<out>/<data set>.json and .md")
    p.add_argument("--repository", type=Path, help="where the split models are published (default: <out>/models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--jobs",
        type=int,
        help="data sets run at once, one process each (default: the number of cores)",
    )
    p.set_defaults(run=_run_uci)


def _run_uci(args: argparse.Namespace) -> None:
    from training.uci import main as uci_main

    uci_main(
        args.data_dir,
        splits=args.splits,
        epochs_multiplier=args.epochs_multiplier,
        samples=args.samples,
        seed=args.seed,
        likelihood=args.likelihood,
        dropout=args.dropout,
        concrete_scales=args.concrete_scale,
        beta=args.beta,
        out=args.out,
        repository=args.repository,
        jobs=args.jobs,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "train")
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = _train_parser(sub)
    _import_parser(sub)
    _uci_parser(sub)
    _evaluate_parser(sub)
    if argv[0] in ("-h", "--help"):  # the default command's options belong on the first help page too
        parser.print_help()
        print("\ntrain (the default command, so `python -m training [options]`):\n")
        print(train_parser.format_help())
        print("`python -m training import --help`, `... evaluate --help` and `... uci --help` list theirs.")
        return 0
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
