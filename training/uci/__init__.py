"""Gal & Ghahramani's UCI regression benchmark (ICML 2016), reproduced through our own export path.

``python -m training uci --data-dir ../shared/datasets/uci`` runs it. By concern:

- ``data``: the data set folders (the paper's code's layout), standardization, weight decay, keys;
- ``trainer``: the stacked trainer (all networks of a phase at once, each as Keras ``fit`` alone);
- ``scoring``: validation MC log-likelihood and RMSE of the in-memory networks;
- ``publish``: a split's final network exported with the project's code, test scores from the SavedModel;
- ``protocol``: grid search, retraining and the runs (``--likelihood``, ``--dropout grid|concrete``);
- ``report``: mean ± standard error, the published numbers, JSON and Markdown files.
"""

from training.uci.data import (
    LENGTH_SCALE,
    VALIDATION_FRACTION,
    Standardization,
    UciDataset,
    dataset_folders,
    load_dataset,
    network_key,
    weight_decay,
)
from training.uci.protocol import DEFAULT_EPOCHS_MULTIPLIER, main, run
from training.uci.report import PUBLISHED, markdown, mean_and_standard_error, write_results
from training.uci.scoring import mc_scores
from training.uci.trainer import BATCH_SIZE, Weights, epoch_draw, train_networks, training_loss

__all__ = [
    "BATCH_SIZE",
    "DEFAULT_EPOCHS_MULTIPLIER",
    "LENGTH_SCALE",
    "PUBLISHED",
    "VALIDATION_FRACTION",
    "Standardization",
    "UciDataset",
    "Weights",
    "dataset_folders",
    "epoch_draw",
    "load_dataset",
    "main",
    "markdown",
    "mc_scores",
    "mean_and_standard_error",
    "network_key",
    "run",
    "train_networks",
    "training_loss",
    "weight_decay",
    "write_results",
]
