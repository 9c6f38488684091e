"""Training data: the embedded digits set, or the user's CSV / .npz file, checked before use."""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from training.artifact import Task

DIGITS = "sklearn digits"
"""How training metadata names the embedded data set."""


class DataError(ValueError):
    """Input data that cannot be trained on; the message says what is wrong and where."""


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (float32) and targets ``y``: class indices, or float32 ``[n, outputs]``."""

    name: str
    x: np.ndarray
    y: np.ndarray
    task: Task
    class_labels: list[str] | None = None
    feature_names: list[str] | None = None
    target_names: list[str] | None = None
    value_range: float | None = None
    """Known largest feature value (pixel intensity); features are then scaled by it."""

    def subset(self, rows: np.ndarray) -> Dataset:
        return replace(self, x=self.x[rows], y=self.y[rows])


def digits(images: bool = False) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 0-16 intensities), shipped offline."""
    bunch = load_digits()
    x = bunch.images[..., np.newaxis] if images else bunch.data
    return Dataset(
        name="digits",
        x=x.astype(np.float32),
        y=bunch.target.astype(np.int64),
        task="classification",
        class_labels=[str(label) for label in bunch.target_names],
        feature_names=None if images else [f"pixel_{r}_{c}" for r in range(8) for c in range(8)],
        value_range=16.0,
    )


class Columns(NamedTuple):
    """A data file as read, before labels are interpreted: finite features, raw labels (text or numbers)."""

    feature_names: list[str] | None
    x: np.ndarray
    labels: np.ndarray
    target_names: list[str]


def load(path: str | Path, target: str | None = None, task: Task | None = None) -> Dataset:
    """Read a CSV file (``target`` names the label column) or an .npz file with ``x`` and ``y``."""
    path = Path(path)
    return _from_columns(path, *read_columns(path, target), task)


def read_columns(path: str | Path, target: str | None = None) -> Columns:
    """The features and raw labels of a CSV file (``target`` names the label column) or an .npz file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        if not target:
            raise DataError(f"{path}: a CSV file needs --target, the name of the label column")
        columns = Columns(*_read_csv(path, target))
    elif path.suffix.lower() == ".npz":
        columns = _read_npz(path)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .npz")
    _check_finite(path, "features", columns.x)
    return columns


def _read_csv(path: Path, target: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = [name.strip() for name in rows[0]]
    if target not in header:
        raise DataError(f"{path}: no target column {target!r}; columns are {', '.join(header)}")
    width = len(header)
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != width:
            raise DataError(f"{path}, line {number}: {len(row)} fields, the header has {width}")
    column = header.index(target)
    features = [name for i, name in enumerate(header) if i != column]
    labels = np.asarray([row[column].strip() for row in rows[1:]])
    values = []
    for number, row in enumerate(rows[1:], start=2):
        try:
            values.append([float(v) for i, v in enumerate(row) if i != column])
        except ValueError:
            cells = enumerate(zip(header, row, strict=True))
            bad = next(name for i, (name, v) in cells if i != column and not _is_number(v))
            raise DataError(f"{path}, line {number}: column {bad!r} is not a number") from None
    return features, np.asarray(values, dtype=np.float64), labels, [target]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_npz(path: Path) -> Columns:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"x", "y"} - set(arrays.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(sorted(missing))}; needs 'x' and 'y'")
            x, y = arrays["x"], arrays["y"]
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error})") from None
    if x.ndim < 2 or len(x) != len(y):
        raise DataError(f"{path}: x must be [rows, features...] and y [rows, ...], got {x.shape} and {y.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: x must be numeric, got {x.dtype}")
    return Columns(None, x.astype(np.float64), y, ["y"])


def _from_columns(path: Path, features, x: np.ndarray, labels, target_names, task: Task | None) -> Dataset:
    numeric = _numeric(labels)
    task = task or _infer_task(numeric)
    if task == "classification":
        if np.ndim(labels) != 1:
            raise DataError(f"{path}: classification needs one label per row, got shape {np.shape(labels)}")
        names = [str(v) for v in labels]
        class_labels = sorted(set(names), key=_label_order)
        if len(class_labels) < 2:
            raise DataError(f"{path}: classification needs at least two classes, found {class_labels}")
        index = {label: i for i, label in enumerate(class_labels)}
        y = np.asarray([index[name] for name in names], dtype=np.int64)
    else:
        if numeric is None:
            raise DataError(f"{path}: regression needs a numeric target")
        class_labels = None
        y = numeric.reshape(len(x), -1)
        _check_finite(path, "target", y)
    return Dataset(
        name=path.stem,
        x=x.astype(np.float32),
        y=y if task == "classification" else y.astype(np.float32),
        task=task,
        class_labels=class_labels,
        feature_names=features,
        target_names=target_names,
    )


def _numeric(labels) -> np.ndarray | None:
    try:
        return np.asarray(labels, dtype=np.float64)
    except ValueError:
        return None


def _check_finite(path: Path, what: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise DataError(f"{path}: {what} contain NaN or infinite values in {len(rows)} row(s) (0-based: {shown})")


def _label_order(label: str) -> tuple[int, float, str]:
    """Numeric labels sort numerically ('2' before '10'), others alphabetically."""
    return (0, float(label), "") if _is_number(label) else (1, 0.0, label)


def _infer_task(numeric: np.ndarray | None) -> Task:
    """Text labels or few distinct integers mean classification; other numbers, regression."""
    if numeric is None:
        return "classification"
    if numeric.ndim != 1 or not np.isfinite(numeric).all():
        return "regression"
    integral = bool(np.all(numeric == np.round(numeric)))
    few = len(np.unique(numeric)) <= max(2, min(50, len(numeric) // 10))
    return "classification" if integral and few else "regression"


def split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out ``fraction`` of the rows, stratified by class for classification."""
    rows = np.arange(len(dataset.y))
    stratify = dataset.y if dataset.task == "classification" else None
    try:
        kept, held = train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as error:
        raise DataError(f"{dataset.name}: cannot hold out {fraction:.0%} of {len(rows)} rows ({error})") from None
    return dataset.subset(np.sort(kept)), dataset.subset(np.sort(held))
