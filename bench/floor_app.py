"""The floor: a bare FastAPI app whose one POST route returns a constant.

Nothing a model server does can be cheaper than this over HTTP with the same framework and
uvicorn, so the benchmark judges the others against it. It does not even read the body.
"""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.post("/predict")
async def predict() -> dict[str, str]:
    return {"status": "ok"}
