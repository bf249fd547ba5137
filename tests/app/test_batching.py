"""The micro-batcher: concurrent requests share one model call, each gets its own slice, faults reach everyone."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from histodetect.app.batching import Busy, FairLock, MicroBatcher


def patches(values: list[int]) -> np.ndarray:
    """One fake patch per value, the value in every pixel, so an answer shows which patch it belongs to."""
    return np.stack([np.full((96, 96, 3), v, np.uint8) for v in values])


class Recorder:
    """A model that answers each patch's pixel value / 255 and records the batch sizes it was called with."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        self.threads.add(threading.current_thread().name)
        return batch[:, 0, 0, 0].astype(np.float32) / 255


async def _ask_together(batcher: MicroBatcher, requests: list[list[int]]) -> list[np.ndarray]:
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.predict(patches(values)) for values in requests))
    finally:
        await batcher.stop()


def test_requests_arriving_together_are_one_call_and_each_gets_its_own_answer() -> None:
    model = Recorder()
    requests = [[1], [2, 3], [4], [5, 6, 7]]
    answers = asyncio.run(_ask_together(MicroBatcher(model, window=0.05), requests))
    for values, answer in zip(requests, answers, strict=True):
        np.testing.assert_allclose(answer, np.array(values) / 255, rtol=1e-6)
    assert model.calls == [7]
    assert all(name.startswith("histodetect-model") for name in model.threads)  # never the event loop's thread


def test_without_batching_each_request_is_its_own_call() -> None:
    model = Recorder()
    asyncio.run(_ask_together(MicroBatcher(model, enabled=False), [[1], [2, 3], [4]]))
    assert model.calls == [1, 2, 1]


def test_a_batch_stops_growing_at_max_batch() -> None:
    model = Recorder()
    asyncio.run(_ask_together(MicroBatcher(model, window=0.05, max_batch=3), [[1], [2], [3], [4], [5]]))
    assert model.calls == [3, 2]


def test_a_model_failure_reaches_every_waiting_request_and_the_worker_goes_on() -> None:
    calls = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.zeros(len(batch), np.float32)

    async def scenario() -> None:
        batcher = MicroBatcher(flaky, window=0.05)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.predict(patches([i])) for i in range(3)), return_exceptions=True)
            assert all(isinstance(r, RuntimeError) for r in results)
            assert len(await batcher.predict(patches([1]))) == 1
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_a_full_queue_answers_busy_instead_of_waiting() -> None:
    scoring, release = threading.Event(), threading.Event()

    def slow(batch: np.ndarray) -> np.ndarray:
        scoring.set()
        release.wait(30)
        return np.zeros(len(batch), np.float32)

    async def scenario() -> None:
        batcher = MicroBatcher(slow, enabled=False, queue_size=1)
        await batcher.start()
        try:
            first = asyncio.create_task(batcher.predict(patches([1])))
            assert await asyncio.to_thread(scoring.wait, 30)  # the worker took it: the model is busy with it
            second = asyncio.create_task(batcher.predict(patches([2])))
            await asyncio.sleep(0)  # one turn of the loop: the new task queues its job, which fills the queue
            assert batcher.queue is not None and batcher.queue.full()
            with pytest.raises(Busy):
                await batcher.predict(patches([3]))
            release.set()
            assert len(await first) == 1 and len(await second) == 1
        finally:
            release.set()
            await batcher.stop()

    asyncio.run(scenario())


def test_the_model_lock_is_taken_in_the_order_it_was_asked_for() -> None:
    lock = FairLock()
    order: list[str] = []

    def take(name: str) -> None:
        with lock:
            order.append(name)

    with lock:
        threads = []
        for name in ("first", "second", "third"):
            threads.append(threading.Thread(target=take, args=(name,)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while lock.waiting < len(threads) and time.monotonic() < deadline:  # this one has its ticket
                time.sleep(0.005)
        assert lock.waiting == 3
    for thread in threads:
        thread.join(10)
    assert order == ["first", "second", "third"] and lock.waiting == 0


def test_a_lone_request_does_not_wait_for_the_window_but_one_on_its_way_is_waited_for() -> None:
    model = Recorder()

    async def scenario() -> None:
        batcher = MicroBatcher(model, window=3600)  # a wait for the window would never end within the test
        await batcher.start()
        try:
            alone = await asyncio.wait_for(batcher.predict(patches([1])), 30)
            assert len(alone) == 1 and model.calls == [1]
            with batcher.incoming():  # a second request is still being read when the first is queued
                first = asyncio.create_task(batcher.predict(patches([2])))
                for _ in range(20):  # the worker takes the first job and waits for the one on its way
                    await asyncio.sleep(0)
                assert model.calls == [1]
            second = await asyncio.wait_for(batcher.predict(patches([3])), 30)
            np.testing.assert_allclose(second, [3 / 255], rtol=1e-6)
            assert len(await first) == 1
            assert model.calls == [1, 2]
        finally:
            await batcher.stop()

    asyncio.run(scenario())
