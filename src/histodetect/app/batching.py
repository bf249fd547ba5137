"""Micro-batching: patches from requests that arrive within a few milliseconds are scored as one model call.

A model scores 64 patches in little more time than one on a CPU (and far less than 64 single calls on a GPU), so
16 clients each posting one patch are best served by one call for all of them. Requests go into a bounded asyncio
queue (full: the caller answers 503 instead of queueing without bound); a single worker task takes every waiting
request, up to ``max_batch`` patches, runs the model once in the model's own thread (the event loop keeps
accepting and reading requests meanwhile) and hands every request its own slice of the answer. Under load the
queue fills while the model works, so batches form by themselves. The worker waits (up to ``window`` seconds) only
for requests already on their way, those whose route is still reading or decoding them (:meth:`incoming`): a lone
request is scored at once instead of paying the window (on a busy CPU, an idle wait also risks losing the core
for a scheduler slice: a lone client's answer took 35 ms with a 1 ms window against 18 ms without). With
batching off the worker takes one request at a time: the benchmark's baseline.

One model, one call at a time: every model call holds :attr:`MicroBatcher.lock`, a first-come-first-served
:class:`FairLock`. Patch batches and Grad-CAM run on the model thread (:meth:`MicroBatcher.run`). A region, which
may need thousands of batches, runs on a thread of its own (:meth:`MicroBatcher.run_aside`) and takes the lock
for each of its batches only, so a patch batch that arrives meanwhile waits for at most one region batch instead of
the whole region; the fairness of the lock is what keeps the region from taking it straight back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


class Busy(Exception):
    """The queue is full: the server has more waiting work than it will hold."""


class FairLock:
    """A lock taken in the order it was asked for (a ticket lock): ``threading.Lock`` promises no order, and a
    thread that releases it and asks again at once (a region going on to its next batch) may win every time."""

    def __init__(self) -> None:
        self._turn = threading.Condition()
        self._issued = 0  # tickets handed out
        self._serving = 0  # the ticket whose holder may go

    @property
    def waiting(self) -> int:
        """Threads waiting for their turn (besides the holder)."""
        with self._turn:
            return max(self._issued - self._serving - 1, 0)

    def __enter__(self) -> None:
        with self._turn:
            ticket = self._issued
            self._issued += 1
            self._turn.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *_: object) -> None:
        with self._turn:
            self._serving += 1
            self._turn.notify_all()


@dataclass
class _Job:
    patches: np.ndarray
    answer: asyncio.Future[np.ndarray]


class MicroBatcher:
    """``predict`` (uint8 ``(N, 96, 96, 3)`` -> float ``(N,)``) behind a queue; start it inside the event loop."""

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        enabled: bool = True,
        window: float = 0.005,
        max_batch: int = 64,
        queue_size: int = 256,
    ) -> None:
        self.predict_fn = predict
        self.enabled = enabled
        self.window = window
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.lock = FairLock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histodetect-model")
        self.aside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histodetect-region")
        self.queue: asyncio.Queue[_Job] | None = None
        self.worker: asyncio.Task[None] | None = None
        self.arriving = 0  # requests being read or decoded (only the event loop's thread counts them)

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.queue_size)
        self.worker = asyncio.create_task(self._work(), name="histodetect-batcher")

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
        self.executor.shutdown(wait=True)
        self.aside.shutdown(wait=True)

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Around reading and decoding a request whose patches will be scored: a batch being gathered meanwhile
        waits for them (up to the window)."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def predict(self, patches: np.ndarray) -> np.ndarray:
        """Probabilities for ``patches``, scored together with whatever else arrives meanwhile."""
        if self.queue is None:
            raise RuntimeError("MicroBatcher.start() has not run")
        job = _Job(patches, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Busy(f"{self.queue_size} requests already wait for the model; try again shortly") from None
        return await job.answer

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One model call, on the model's thread, holding the model lock."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(self._locked, fn, *args, **kwargs))

    async def run_aside(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Long work made of many model calls (a region), one at a time on its own thread; ``fn`` takes
        :attr:`lock` around each of its model calls itself."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.aside, functools.partial(fn, *args, **kwargs))

    def _locked(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return fn(*args, **kwargs)

    async def _work(self) -> None:
        assert self.queue is not None
        while True:
            jobs = await self._gather()
            try:
                probabilities = await self.run(self.predict_fn, np.concatenate([job.patches for job in jobs]))
            except Exception as exc:  # every waiting request hears of it; the worker goes on with the next batch
                for job in jobs:
                    if not job.answer.done():
                        job.answer.set_exception(exc)
                continue
            start = 0
            for job in jobs:
                end = start + len(job.patches)
                if not job.answer.done():  # a request cut off meanwhile has no one waiting
                    job.answer.set_result(probabilities[start:end])
                start = end

    async def _gather(self) -> list[_Job]:
        """The next batch: every waiting job, and those still arriving (within the window), up to ``max_batch``."""
        assert self.queue is not None
        jobs = [await self.queue.get()]
        if not self.enabled:
            return jobs
        total = len(jobs[0].patches)
        deadline = asyncio.get_running_loop().time() + self.window
        while total < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0 or not self.arriving:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            jobs.append(job)
            total += len(job.patches)
        return jobs
