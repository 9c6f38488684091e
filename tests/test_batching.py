"""Dynamic batching on a real model: same answers as unbatched, failures and cancellations stay alone."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import Server

from app.batcher import Batcher
from app.loading import load_version
from app.schemas import DIGIT_ZERO
from training.data import digits


@pytest.fixture(scope="module")
def model(tiny_classifier_dir):
    return load_version("tiny", tiny_classifier_dir)


class CountingRun:
    """The model's own predict, counting calls; the first call can be held to let a queue build up."""

    def __init__(self, model, hold_first: bool = False) -> None:
        self.model = model
        self.calls: list[int] = []
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.calls.append(len(rows))
        if len(self.calls) == 1:
            self.release.wait(10)
        return self.model.predict(rows)


def test_the_flat_signature_call_answers_as_the_keyword_call(model):
    from training import signatures

    x = digits().x[:33].astype(np.float32)
    for rows in (x[:1], x[:7], x):
        by_keyword = signatures.infer(model.serving, rows, model.input_key, model.output_key)
        assert by_keyword.shape == (len(rows), 10) and np.allclose(by_keyword.sum(axis=1), 1, atol=1e-5)
        assert np.array_equal(model.predict(rows), by_keyword)


def test_batched_answers_equal_unbatched_ones_for_a_mix_of_sizes(model):
    x = digits().x[:200]
    sizes = [1, 3, 1, 7, 2, 1, 16, 5, 1, 40, 1, 4]
    starts = np.cumsum([0, *sizes[:-1]])
    requests = [x[s : s + n] for s, n in zip(starts, sizes, strict=True)]
    run = CountingRun(model, hold_first=True)

    async def main():
        batcher = Batcher(run, ThreadPoolExecutor(1), max_rows=32)
        calls = [asyncio.ensure_future(batcher(requests[0]))]
        await asyncio.sleep(0.1)  # the lone first request is running (and held)
        calls += [asyncio.ensure_future(batcher(rows)) for rows in requests[1:]]
        await asyncio.sleep(0.1)
        run.release.set()
        return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    for rows, answer in zip(requests, answers, strict=True):
        assert answer.shape == (len(rows), 10)
        np.testing.assert_allclose(answer, model.predict(rows), rtol=1e-6, atol=1e-7)
    assert run.calls[0] == 1, "a lone request goes at once"
    assert len(run.calls) < len(requests), "queued requests shared calls"
    assert max(run.calls) <= 40 and all(n <= 32 for n in run.calls if n != 40), "batches respect max_rows"


def test_a_cancelled_caller_does_not_break_its_batch(model):
    x = digits().x[:10]
    run = CountingRun(model, hold_first=True)

    async def main():
        batcher = Batcher(run, ThreadPoolExecutor(1), max_rows=32)
        first = asyncio.ensure_future(batcher(x[:1]))
        await asyncio.sleep(0.1)
        waiting = [asyncio.ensure_future(batcher(x[i : i + 1])) for i in range(1, 6)]
        await asyncio.sleep(0.1)
        waiting[2].cancel()
        run.release.set()
        done = await asyncio.gather(first, *waiting, return_exceptions=True)
        return done

    done = asyncio.run(main())
    assert isinstance(done[3], asyncio.CancelledError)
    for i, answer in enumerate(done):
        if i != 3:
            np.testing.assert_allclose(answer, model.predict(x[i : i + 1]), rtol=1e-6, atol=1e-7)
    assert run.calls == [1, 4]


def test_requests_still_being_read_after_a_call_join_the_next_one(model):
    x = digits().x[:8]
    run = CountingRun(model, hold_first=True)

    async def main():
        loop = asyncio.get_running_loop()
        after: list[asyncio.Future] = []

        def arrive(i: int) -> None:  # requests that reach the batcher one loop turn after another
            after.append(asyncio.ensure_future(batcher(x[i : i + 1])))
            if i < 5:
                loop.call_soon(arrive, i + 1)

        def first_call_then_arrivals(rows: np.ndarray) -> np.ndarray:
            outputs = run(rows)
            if len(run.calls) == 1:
                loop.call_soon_threadsafe(arrive, 3)
            return outputs

        batcher = Batcher(first_call_then_arrivals, ThreadPoolExecutor(1), max_rows=32)
        first = asyncio.ensure_future(batcher(x[:1]))
        await asyncio.sleep(0.1)
        during = asyncio.ensure_future(batcher(x[1:3]))  # queued while the first call runs
        await asyncio.sleep(0.05)
        run.release.set()
        answers = await asyncio.gather(first, during)
        await asyncio.sleep(0.2)
        return answers + await asyncio.gather(*after)

    answers = asyncio.run(main())
    assert [len(a) for a in answers] == [1, 2, 1, 1, 1]
    for i, answer in enumerate(answers[2:], start=3):
        np.testing.assert_allclose(answer, model.predict(x[i : i + 1]), rtol=1e-6, atol=1e-7)
    assert run.calls == [1, 5], "the next call waited while requests kept arriving"


def test_a_failing_call_fails_its_batch_and_the_batcher_keeps_going(model):
    x = digits().x[:4]

    def run(rows: np.ndarray) -> np.ndarray:
        if len(rows) == 3:
            raise RuntimeError("boom")
        return model.predict(rows)

    async def main():
        batcher = Batcher(run, ThreadPoolExecutor(1), max_rows=32)
        failed = await asyncio.gather(batcher(x[:3]), return_exceptions=True)
        return failed, await batcher(x[:2])

    failed, after = asyncio.run(main())
    assert isinstance(failed[0], RuntimeError)
    np.testing.assert_allclose(after, model.predict(x[:2]), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def server(tiny_classifier_dir):
    server = Server(tiny_classifier_dir.parent.parent, max_batch_size=8)
    yield server
    server.stop()


def test_a_bad_request_among_concurrent_good_ones_fails_alone(server):
    rows = digits().x[:64].tolist()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        expected = [client.post("/predict", json={"instances": [row]}).json() for row in rows]
        assert all(e["predictions"][0]["label"] in "0123456789" for e in expected)

        def call(i: int) -> httpx.Response:
            if i % 9 == 4:
                return client.post("/predict", json={"instances": [DIGIT_ZERO[:10]]})
            return client.post("/predict", json={"instances": [rows[i]]})

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(call, range(64)))
    for i, response in enumerate(responses):
        if i % 9 == 4:
            assert response.status_code == 422 and "expected a list of 64" in response.json()["detail"]
        else:
            assert response.status_code == 200
            got = response.json()["predictions"][0]["probabilities"]
            np.testing.assert_allclose(got, expected[i]["predictions"][0]["probabilities"], rtol=1e-5, atol=1e-7)
