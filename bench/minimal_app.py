"""The minimal FastAPI route around the SavedModel: what one would write in ten lines.

It parses the JSON body, calls the model's ``serving_default`` signature on the instances and
returns the probabilities: no validation, no batching, no error handling. The benchmark's
second peer, serving the version directory named by ``BENCH_SAVEDMODEL``.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf
from fastapi import FastAPI, Request

from training import artifact

signature = tf.saved_model.load(os.environ["BENCH_SAVEDMODEL"]).signatures["serving_default"]
app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> dict[str, list]:
    instances = json.loads(await request.body())["instances"]
    outputs = signature(**{artifact.INPUTS_KEY: tf.constant(instances, tf.float32)})
    return {"probabilities": outputs[artifact.OUTPUTS_KEY].numpy().tolist()}
