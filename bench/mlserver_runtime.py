"""A custom MLServer runtime serving a TensorFlow SavedModel's ``serving_default`` signature.

MLServer 1.7 ships runtimes for scikit-learn, XGBoost, MLflow and others, but none for
TensorFlow, so the benchmark brings this one. It runs inside MLServer's own virtual environment
(``bench/.venv-mlserver``), never in the project's, and imports nothing from the project: the
signature's one input and one output are found by name from the signature itself. MLServer's
adaptive batching stacks concurrent requests along the first axis before ``predict`` and splits
the answer after it, so ``predict`` sees one ``[rows, features]`` tensor either way.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class SavedModelRuntime(MLModel):
    """Loads ``parameters.uri`` (a SavedModel version directory) and answers with its outputs."""

    async def load(self) -> bool:
        self._signature = tf.saved_model.load(self.settings.parameters.uri).signatures["serving_default"]
        _, inputs = self._signature.structured_input_signature
        (self._input,) = inputs
        (self._output,) = self._signature.structured_outputs
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        outputs = self._signature(**{self._input: tf.constant(rows)})[self._output].numpy()
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self._output, outputs)])
