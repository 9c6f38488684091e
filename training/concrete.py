"""Concrete Dropout (Gal, Hron & Kendall, NeurIPS 2017): a dropout layer whose rate is learned.

Training uses the relaxed-Bernoulli ("concrete") mask, so the rate gets gradients; the objective
adds, per layer, ``weight_regularizer · ‖W‖² / (1 - p)`` on the kernel the layer feeds
(``ConcreteL2``, given to that Dense layer) and ``dropout_regularizer · d · (p log p + (1-p) log(1-p))``
(the negative entropy of the rate, ``d`` the layer's input width). In inference mode the layer is
the identity, like Keras' inverted dropout. For MC sampling, ``training.mc_dropout`` treats it as
a ``Dropout`` at the learned p: hard Bernoulli masks at that rate through the same stateless path
as every other dropout layer (the graph reads the rate's variable; it never writes one).
"""

from __future__ import annotations

import math

import keras
import numpy as np

_TEMPERATURE = 0.1
"""Temperature of the relaxed Bernoulli (the paper's value)."""
INITIAL_RATE = 0.1
"""Where learned rates start (``python -m training --dropout concrete`` and ``uci --dropout concrete``)."""
_EPS = 1e-7


class ConcreteDropout(keras.layers.Layer):
    """Dropout with a learned rate ``p = sigmoid(p_logit)``, started at ``initial_rate``."""

    def __init__(self, initial_rate: float = INITIAL_RATE, dropout_regularizer: float = 1e-5, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < initial_rate < 1.0:
            raise ValueError(f"concrete dropout needs an initial rate in (0, 1), got {initial_rate}")
        self.initial_rate = initial_rate
        self.dropout_regularizer = dropout_regularizer
        self.seed_generator = keras.random.SeedGenerator()

    def build(self, input_shape) -> None:
        logit = math.log(self.initial_rate) - math.log(1.0 - self.initial_rate)
        self.p_logit = self.add_weight(name="p_logit", shape=(), initializer=keras.initializers.Constant(logit))

    @property
    def rate(self) -> float:
        """The learned dropout rate, as a number (eager: for metadata and people)."""
        return float(1.0 / (1.0 + np.exp(-float(self.p_logit.numpy()))))

    def probability(self):
        return keras.ops.sigmoid(self.p_logit)

    def call(self, inputs, training=None):
        if not training:
            return inputs
        p = self.probability()
        self.add_loss(self.dropout_regularizer * float(np.prod(inputs.shape[1:])) * negative_entropy(p))
        return relaxed_dropout(inputs, p, keras.random.uniform(keras.ops.shape(inputs), seed=self.seed_generator))


def concrete_regularizers(rows: int, length_scale: float = 1e-2, tau: float = 1.0) -> tuple[float, float]:
    """Gal, Hron & Kendall's factors for ``rows`` training rows: weights ``l² / (τN)``, rates ``2 / (τN)``.

    ``length_scale`` is the prior length-scale l (1e-2, as for the fixed-rate networks' weight decay).
    ``tau`` is the precision of a homoscedastic Gaussian likelihood in the units the network trains in:
    its loss, the MSE, is the Gaussian NLL divided by τ/2, so the regularizers are divided by τ too.
    It is 1 for losses that are the whole NLL (classifiers, heteroscedastic networks); ``tau=1``
    gives exactly ``l² / N`` and ``2 / N``.
    """
    return length_scale**2 / (tau * rows), 2.0 / (tau * rows)


def negative_entropy(p):
    """``p log p + (1 - p) log(1 - p)`` of a rate (elementwise): the dropout regularizer per input unit."""
    return p * keras.ops.log(p + _EPS) + (1.0 - p) * keras.ops.log(1.0 - p + _EPS)


def relaxed_dropout(inputs, p, u):
    """Training-mode concrete dropout of ``inputs`` at rate ``p`` (broadcastable), with ``u`` its uniform noise.

    A unit is (softly) dropped where ``u`` is below ``p``: the relaxed Bernoulli mask at temperature 0.1,
    then inverted-dropout scaling ``1 / (1 - p)``. Shared by the layer and the UCI stacked trainer
    (``training.uci.trainer``), which must compute exactly what the layer does.
    """
    logits = (
        keras.ops.log(p + _EPS)
        - keras.ops.log(1.0 - p + _EPS)
        + keras.ops.log(u + _EPS)
        - keras.ops.log(1.0 - u + _EPS)
    )
    dropped = keras.ops.sigmoid(logits / _TEMPERATURE)
    return inputs * (1.0 - dropped) / (1.0 - p)


class ConcreteL2(keras.regularizers.Regularizer):
    """``factor · ‖W‖² / (1 - p)`` for the kernel fed by ``dropout`` (the concrete dropout weight term)."""

    def __init__(self, factor: float, dropout: ConcreteDropout) -> None:
        self.factor = factor
        self.dropout = dropout

    def __call__(self, kernel):
        return self.factor * keras.ops.sum(keras.ops.square(kernel)) / (1.0 - self.dropout.probability())
