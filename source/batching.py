"""Dynamic request batching for the REST API: concurrent requests share one forward pass.

One model worker thread takes what has queued, up to `max_batch` images, runs one forward
pass and hands each request its own rows, so every request gets what it would have got alone
(the same top-k; probabilities equal to float32 rounding). Like Triton's dynamic batcher and
TorchServe's batch_size / max_batch_delay, the worker waits for more only while other
requests are still being decoded, and never more than `max_wait_ms` after the first one it
holds: one client alone waits for nothing. The queue is bounded: past `max_queue` waiting
requests, `submit` and `predict` raise QueueFull (the API answers 503 with Retry-After).

Two ways in. `submit(items)` queues the raw (name, bytes) pairs and returns a Future; the
worker decodes them with the rest of its batch, so an asyncio server hands a request over
with no thread of its own (`await asyncio.wrap_future(batcher.submit(items))`). `predict`
decodes in the calling thread first (large uploads, in parallel with other callers) and
waits for the answer.

    batcher = Batcher(predictor, max_batch=32, max_wait_ms=5, max_queue=256)
    # or Batcher(predictor, runner=model_process.ModelProcess(spec)): batches in a child process
    batcher.start()
    predictions = batcher.predict([("a.png", data), ("b.png", other)], topk=3)
    predictions = await asyncio.wrap_future(batcher.submit([("c.png", small)], topk=3))
    batcher.stop()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from predict import Prediction, Predictor, Prepared

# One request as the model worker gets it: raw (name, bytes) pairs to decode or None, the
# Prepared inputs or None, and its topk.
Request = tuple[list[tuple[str, object]] | None, Prepared | None, int]


def run_batch(predictor: Predictor, requests: list[Request]) -> tuple[list, int]:
    """(outcomes, images): one forward pass over every readable image of the requests, after
    decoding those still raw. Each request's outcome is Predictor.predict's answer for it
    (its inputs' errors when none was readable) or, if the pass failed, the exception;
    images is how many the forward pass took (0: none)."""
    try:
        prepared = [p if p is not None else predictor.prepare(items) for items, p, _ in requests]
    except Exception as err:  # the requests get the error; the worker keeps serving
        return [err] * len(requests), 0
    outcomes: list = [p.results for p in prepared]  # the unreadable ones are final already
    ready = [i for i, p in enumerate(prepared) if p.pixels is not None]
    if not ready:
        return outcomes, 0
    try:
        logits = predictor.logits(np.concatenate([prepared[i].pixels for i in ready]))
        start = 0
        for i in ready:
            rows = logits[start : start + len(prepared[i].index)]
            start += len(rows)
            outcomes[i] = predictor.finish(prepared[i], rows, requests[i][2])
    except Exception as err:  # those requests get the error; the worker keeps serving
        for i in ready:
            outcomes[i] = err
        return outcomes, 0
    return outcomes, len(logits)


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds; try again after `retry_after` s."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting for the model; retry shortly")
        self.retry_after = retry_after


@dataclass
class Job:
    items: list[tuple[str, object]] | None  # raw inputs for the worker to decode, or None
    prepared: Prepared | None  # decoded inputs, or None until the worker decodes `items`
    topk: int
    size: int  # images in this request (the batch bound counts them)
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class Batcher:
    """A queue of prepared requests and the one thread that runs the model on them."""

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
        runner: Callable[[list[Request]], tuple[list, int]] | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be at least 1, max_wait_ms at least 0")
        self.predictor = predictor
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.on_batch = on_batch  # called with each forward pass's image count (metrics)
        # What runs a batch: run_batch in this thread, or model_process.ModelProcess.
        self.runner = runner or (lambda requests: run_batch(predictor, requests))
        self.jobs: deque[Job] = deque()
        self.decoding = 0  # requests being decoded: worth waiting for
        self.lock = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for the model."""
        return len(self.jobs)

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self.work, name="model-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # ---- request side (the web server's threads) --------------------------------------------

    def submit(
        self, items: list[tuple[str, object]], topk: int = 5, prepared: Prepared | None = None
    ) -> Future:
        """Queue a request; its Future gets Predictor.predict's answer for the (name, input)
        pairs. Without `prepared` the worker decodes them. QueueFull when the queue is full."""
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        job = Job(items if prepared is None else None, prepared, topk, len(items))
        with self.lock:
            if len(self.jobs) >= self.max_queue:
                raise QueueFull(len(self.jobs), retry_after=1)
            self.jobs.append(job)
            self.lock.notify_all()
        return job.future

    def predict(self, items: list[tuple[str, object]], topk: int = 5) -> list[Prediction]:
        """Predictor.predict's answer for (name, input) pairs: decoded in this thread (in
        parallel with other callers), then through the shared worker."""
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        with self.lock:
            if len(self.jobs) >= self.max_queue:
                raise QueueFull(len(self.jobs), retry_after=1)
            self.decoding += 1
        try:
            prepared = self.predictor.prepare(items)  # decoding runs here, in parallel
        finally:
            with self.lock:
                self.decoding -= 1
                self.lock.notify_all()
        if prepared.pixels is None:  # nothing readable: no model call
            return prepared.results
        return self.submit(items, topk, prepared).result()

    # ---- the model worker --------------------------------------------------------------------

    def take(self) -> list[Job]:
        """The next batch: what has queued, up to max_batch images (a larger request alone),
        waiting up to max_wait after the first while other requests are still decoding."""
        with self.lock:
            while self.running and not self.jobs:
                self.lock.wait()
            if not self.running:
                return []
            deadline = self.jobs[0].arrived + self.max_wait
            while (
                self.running
                and self.decoding
                and sum(j.size for j in self.jobs) < self.max_batch
                and time.monotonic() < deadline
            ):
                self.lock.wait(timeout=max(deadline - time.monotonic(), 0.0))
            batch, images = [], 0
            while self.jobs and (not batch or images + self.jobs[0].size <= self.max_batch):
                job = self.jobs.popleft()
                # A request whose caller gave up (its Future cancelled, e.g. the asyncio task
                # was) is dropped; a running Future can no longer be cancelled.
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
                    images += job.size
            return batch

    def work(self) -> None:
        while self.running:
            batch = self.take()
            if batch:
                self.run(batch)
        with self.lock:  # stopped: nobody will answer what is still queued
            for job in self.jobs:
                job.future.cancel()
            self.jobs.clear()

    def run(self, batch: list[Job]) -> None:
        """One forward pass for the batch (through the runner: run_batch here, or in the
        model process); each job gets its answer, or the error."""
        try:
            outcomes, images = self.runner([(job.items, job.prepared, job.topk) for job in batch])
        except Exception as err:  # e.g. the model process died: these requests fail, not the worker
            outcomes, images = [err] * len(batch), 0
        if images and self.on_batch is not None:
            self.on_batch(images)
        for job, outcome in zip(batch, outcomes, strict=True):
            job.items = job.prepared = None
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
