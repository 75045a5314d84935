"""The REST API's model worker in a process of its own, so the forward pass is off the GIL.

In one process the event loop (HTTP, multipart parsing, JSON) and the model worker thread
take turns holding Python's GIL: eager PyTorch dispatches every operator holding it, and
decoding and top-k are Python too. Measured on 2 cores at 16 clients, that server used about
one core of the two however the work was split (docs/benchmarks/serving.md). Like the model
workers of TorchServe and Triton's Python backend, ModelProcess runs the batches that
batching.Batcher forms (decode, one forward pass, top-k) in a child process with its own
interpreter: the web server's process keeps the queue, the batching and the HTTP, and waits
on a pipe with the GIL released. `submit` returns at once, so the Batcher sends the next batch
while the child still runs one (serve.py --in-flight, default 2): the child finds it waiting
in the pipe instead of idling while the web server answers and gathers.

    spec = PredictorSpec("metadata/models/model.pth", device="cpu", threads=1)
    runner = ModelProcess(spec)
    runner.start()  # loads and checks the model in the child; ModelProcessError if it cannot
    # (or runner.launch() first, and start() later: the child loads while this process works)
    batcher = Batcher(predictor, runner=runner)  # Batcher.run submits each batch to it
    outcomes, images = runner(requests)  # or one batch, waited for (runner.submit: a Future)
    runner.stop()

A child that dies mid-batch (killed, out of memory) fails the requests of the batches it held
(the one it ran and the one waiting in its pipe) with ModelProcessError and is started again
for the next one; a parent that dies closes the pipe, and the child exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from batching import Request, run_batch
from predict import Predictor

log = logging.getLogger("serve")


class ModelProcessError(RuntimeError):
    """The model process could not start, or died while it held a batch."""


class ConstantLogits:
    """The no-model ceiling of benchmarks/load.py (SERVE_NO_MODEL=1, never for serving): the
    forward pass replaced by a constant answer, so what remains is HTTP, multipart parsing,
    decoding, preprocessing, batching and JSON."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def logits(self, batch):
        return np.zeros((len(batch), self.num_classes), dtype=np.float32)


@dataclass(frozen=True)
class PredictorSpec:
    """How to load the served model again in another process (it pickles; a Predictor does
    not). The backend follows model_path and $PREDICT_BACKEND, which the child inherits."""

    model_path: str
    device: str = "auto"
    threads: int = 0  # 0: the library's default
    no_model: bool = False  # ConstantLogits instead of the forward pass (the load ceiling)

    def load(self) -> Predictor:
        """The Predictor, checked (Predictor.check), with its forward-pass threads set."""
        predictor = Predictor(self.model_path, device=self.device, threads=self.threads or None)
        if predictor.backend != "onnx":  # the onnx backend never imports torch
            from runtime import set_torch_threads

            set_torch_threads(self.threads)
        predictor.check()
        if self.no_model:
            predictor.engine = ConstantLogits(len(predictor.classes))
        return predictor


def _child(conn, spec: PredictorSpec) -> None:
    """The model process: load the model, then answer each batch until told to stop (None)
    or until the parent is gone (the pipe closes)."""
    try:
        predictor = spec.load()
    except Exception as err:  # noqa: BLE001 - whatever the model's fault, one line back
        conn.send(("error", " ".join(str(err).split()) or type(err).__name__))
        return
    conn.send(("ready", None))
    while True:
        try:
            requests = conn.recv()
        except (EOFError, OSError):  # the web server's process is gone
            requests = None
        if requests is None:  # nothing to flush or save: skip the interpreter's slow exit
            os._exit(0)
        outcomes, images = run_batch(predictor, requests)
        # Exceptions travel as ModelProcessError with their text: a library's exception type
        # may not unpickle in the parent.
        outcomes = [
            ModelProcessError(f"{type(o).__name__}: {o}") if isinstance(o, BaseException) else o
            for o in outcomes
        ]
        conn.send((outcomes, images))


@dataclass
class _Child:
    """One model process: its pipe, the Futures of the batches it holds (in the order sent,
    which is the order it answers), and the thread that reads its answers."""

    process: multiprocessing.Process
    conn: object
    pending: deque = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    gone: bool = False  # its pipe closed: pending Futures failed, no more may be added
    stopping: bool = False  # asked to stop (its exit is not an error)
    reader: threading.Thread | None = None


class ModelProcess:
    """run_batch in a child process (multiprocessing's spawn: no fork of a process with
    threads). `submit` sends a batch and returns at once with a Future, so the Batcher can
    queue the next batch in the pipe while the child runs this one (the child never waits
    for the web server between batches); a reader thread sets the Futures from the answers."""

    def __init__(self, spec: PredictorSpec, start_timeout: float = 300.0):
        self.spec = spec
        self.start_timeout = start_timeout
        self.child: _Child | None = None
        self.lock = threading.Lock()  # one caller starts or replaces the child at a time

    def launch(self) -> None:
        """Start the child, which loads the model while the caller goes on (start waits)."""
        context = multiprocessing.get_context("spawn")
        conn, child_end = context.Pipe()
        process = context.Process(
            target=_child, args=(child_end, self.spec), name="model-process", daemon=True
        )
        process.start()
        child_end.close()
        self.child = _Child(process, conn)

    def start(self) -> None:
        """Start the child (unless launched) and wait until its model is loaded and checked."""
        if self.child is None:
            self.launch()
        child = self.child
        if not child.conn.poll(self.start_timeout):
            self.stop()
            raise ModelProcessError(f"the model process did not start in {self.start_timeout} s")
        try:
            status, reason = child.conn.recv()
        except EOFError:
            child.process.join(5)
            child.conn.close()
            self.child = None
            raise ModelProcessError(
                f"the model process exited while loading (exit code {child.process.exitcode})"
            ) from None
        if status != "ready":
            self.stop()
            raise ModelProcessError(f"the model process cannot serve: {reason}")
        child.reader = threading.Thread(
            target=self._read, args=(child,), name="model-process-reader", daemon=True
        )
        child.reader.start()

    def submit(self, requests: list[Request]) -> Future:
        """Send run_batch(requests) to the child; the Future gets its (outcomes, images), or
        ModelProcessError if the child dies before answering (it is started again for the
        next batch). A child found dead while idle is replaced first: no request fails."""
        future: Future = Future()
        with self.lock:
            child = self.child
            if child is not None and not child.process.is_alive():
                child = self.child = None  # its reader logs the exit and closes the pipe
            if child is None:
                self.start()
                child = self.child
            with child.lock:
                if child.gone:  # died between the check and now: fail like a death mid-batch
                    future.set_exception(self._died(child))
                    return future
                child.pending.append(future)
            with contextlib.suppress(OSError):  # a child dying now: its reader fails the Future
                child.conn.send(requests)
        return future

    def __call__(self, requests: list[Request]) -> tuple[list, int]:
        """run_batch(requests) in the child, waited for."""
        return self.submit(requests).result()

    def _read(self, child: _Child) -> None:
        """The reader thread: each answer to the oldest pending Future; when the pipe closes
        (the child exited), every batch still pending fails and the child is forgotten."""
        while True:
            try:
                answer = child.conn.recv()
            except (EOFError, OSError):
                break
            with child.lock:
                future = child.pending.popleft()
            future.set_result(answer)
        with child.lock:
            child.gone = True
            failed, child.pending = list(child.pending), deque()
        error = self._died(child)
        child.conn.close()
        if not child.stopping:
            log.error("the model process died (exit code %s); starting another",
                      child.process.exitcode)  # fmt: skip
        for future in failed:
            future.set_exception(error)
        with self.lock:  # (after the Futures: submit may hold it while a new child loads)
            if self.child is child:
                self.child = None

    @staticmethod
    def _died(child: _Child) -> ModelProcessError:
        child.process.join(5)  # reaped, for its exit code
        if child.stopping:
            return ModelProcessError("the model process was stopped while it held this request")
        return ModelProcessError(
            f"the model process died (exit code {child.process.exitcode}) while it held this "
            "request; it is restarted for the next one"
        )

    @property
    def process(self) -> multiprocessing.Process | None:
        return self.child.process if self.child is not None else None

    @property
    def pid(self) -> int | None:
        return self.child.process.pid if self.child is not None else None

    def stop(self) -> None:
        """Ask the child to stop, then make sure it has (batches it still held fail)."""
        child, self.child = self.child, None
        if child is None:
            return
        child.stopping = True
        with contextlib.suppress(OSError):  # already gone
            child.conn.send(None)
        child.process.join(10)
        if child.process.is_alive():
            child.process.kill()
            child.process.join(5)
        if child.reader is not None:
            child.reader.join(10)  # it closes the pipe
        else:
            child.conn.close()
