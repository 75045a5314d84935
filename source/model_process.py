"""The REST API's model worker in a process of its own, so the forward pass is off the GIL.

In one process the event loop (HTTP, multipart parsing, JSON) and the model worker thread
take turns holding Python's GIL: eager PyTorch dispatches every operator holding it, and
decoding and top-k are Python too. Measured on 2 cores at 16 clients, that server used about
one core of the two however the work was split (docs/benchmarks/serving.md). Like the model
workers of TorchServe and Triton's Python backend, ModelProcess runs the batches that
batching.Batcher forms (decode, one forward pass, top-k) in a child process with its own
interpreter: the web server's process keeps the queue, the batching and the HTTP, and waits
on a pipe with the GIL released.

    spec = PredictorSpec("metadata/models/model.pth", device="cpu", threads=1)
    runner = ModelProcess(spec)
    runner.start()  # loads and checks the model in the child; ModelProcessError if it cannot
    # (or runner.launch() first, and start() later: the child loads while this process works)
    batcher = Batcher(predictor, runner=runner)  # Batcher.run sends each batch through it
    runner.stop()

A child that dies mid-batch (killed, out of memory) fails that batch's requests with
ModelProcessError and is started again for the next one; a parent that dies closes the pipe,
and the child exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
from dataclasses import dataclass

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


class ModelProcess:
    """run_batch in a child process (multiprocessing's spawn: no fork of a process with
    threads). Called by one thread at a time: the Batcher's worker."""

    def __init__(self, spec: PredictorSpec, start_timeout: float = 300.0):
        self.spec = spec
        self.start_timeout = start_timeout
        self.process: multiprocessing.Process | None = None
        self.conn = None
        self.lock = threading.Lock()

    def launch(self) -> None:
        """Start the child, which loads the model while the caller goes on (start waits)."""
        context = multiprocessing.get_context("spawn")
        self.conn, child_end = context.Pipe()
        self.process = context.Process(
            target=_child, args=(child_end, self.spec), name="model-process", daemon=True
        )
        self.process.start()
        child_end.close()

    def start(self) -> None:
        """Start the child (unless launched) and wait until its model is loaded and checked."""
        if self.process is None:
            self.launch()
        if not self.conn.poll(self.start_timeout):
            self.stop()
            raise ModelProcessError(f"the model process did not start in {self.start_timeout} s")
        try:
            status, reason = self.conn.recv()
        except EOFError:
            code = self._discard()
            raise ModelProcessError(
                f"the model process exited while loading (exit code {code})"
            ) from None
        if status != "ready":
            self.stop()
            raise ModelProcessError(f"the model process cannot serve: {reason}")

    def __call__(self, requests: list[Request]) -> tuple[list, int]:
        """run_batch(requests) in the child; ModelProcessError if the child died with them
        (it is started again for the next batch)."""
        with self.lock:
            if self.process is not None and not self.process.is_alive():  # died while idle
                log.error("the model process died (exit code %s); starting another",
                          self._discard())  # fmt: skip
            if self.process is None:
                self.start()
            try:
                self.conn.send(requests)
                return self.conn.recv()
            except (EOFError, OSError):
                code = self._discard()
                log.error("the model process died (exit code %s); starting another", code)
                raise ModelProcessError(
                    f"the model process died (exit code {code}) while it held this request; "
                    "it is restarted for the next one"
                ) from None

    def _discard(self) -> int | None:
        """Forget a child that has exited (reaped within 5 s); its exit code."""
        self.process.join(5)
        code = self.process.exitcode
        self.conn.close()
        self.process = None
        return code

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self) -> None:
        """Ask the child to stop, then make sure it has."""
        if self.process is None:
            return
        with contextlib.suppress(OSError):  # already gone
            self.conn.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
        self._discard()
