"""The API's model worker in a child process (model_process.py): the same answers as the
Predictor in this process, a child that cannot load or that dies, and no child left behind."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from batching import Batcher
from model_process import ModelProcess, ModelProcessError, PredictorSpec
from predict import Predictor
from test_serve import batch_requests, png


@dataclass(frozen=True)
class ExitingSpec(PredictorSpec):
    """The model, in a process that kills itself (exit code 3) on a forward pass while the
    file `alive` is missing, and makes the file first, so the process started after it serves
    normally. Module level: the child unpickles it."""

    alive: str = ""

    def load(self) -> Predictor:
        predictor = super().load()
        real = predictor.engine.logits

        def logits(batch):
            if not Path(self.alive).exists():
                Path(self.alive).touch()
                os._exit(3)
            return real(batch)

        predictor.engine.logits = logits
        return predictor


@pytest.fixture(scope="module")
def predictor(smoke_model) -> Predictor:
    return Predictor(smoke_model, device="cpu")


@pytest.fixture(scope="module")
def alive(tmp_path_factory) -> Path:
    """Remove it, and the runner's next forward pass kills its process (ExitingSpec)."""
    path = tmp_path_factory.mktemp("child") / "alive"
    path.touch()
    return path


@pytest.fixture(scope="module")
def runner(smoke_model, alive):
    """One model process for the module (each start imports torch: seconds)."""
    runner = ModelProcess(ExitingSpec(str(smoke_model), device="cpu", threads=1, alive=str(alive)))
    runner.start()
    yield runner
    child = runner.process
    runner.stop()
    assert child.exitcode == 0  # it stopped when asked


def assert_same(got, alone) -> None:
    """Two lists of Predictions: same sources, decisions, errors and top-k (to 1e-6)."""
    assert [g.source for g in got] == [p.source for p in alone]
    for g, p in zip(got, alone, strict=True):
        assert (g.predicted, g.error) == (p.predicted, p.error)
        assert [c for c, _ in g.topk] == [c for c, _ in p.topk]
        np.testing.assert_allclose([q for _, q in g.topk], [q for _, q in p.topk], atol=1e-6)


def test_batches_in_the_child_answer_like_the_predictor_here(runner, predictor):
    """One batch of requests (one image, several, readable mixed with unreadable, none
    readable) through the child: each gets what Predictor.predict gives it alone."""
    requests = batch_requests()[:15]  # each kind once
    outcomes, images = runner([(files, None, 3) for files in requests])
    alone = [predictor.predict(files, topk=3) for files in requests]
    for got, expected in zip(outcomes, alone, strict=True):
        assert_same(got, expected)
    assert images == sum(p.ok for answers in alone for p in answers)
    assert [p.error for p in outcomes[-1]] == [e.error for e in alone[-1]]  # none readable
    assert all(p.error for p in outcomes[-1])


def test_the_batcher_through_the_child_and_decoded_inputs(runner, predictor):
    """Batcher's two ways in, with the child as its runner: raw bytes (decoded in the child)
    and inputs already decoded here (large uploads)."""
    batcher = Batcher(predictor, max_batch=8, max_wait_ms=0, runner=runner)
    batcher.start()
    try:
        raw = batcher.submit([("red.png", png())], topk=2)
        decoded = batcher.predict([("blue.png", png((0, 0, 200), (9, 31)))], topk=2)
        raw = raw.result(60)
    finally:
        batcher.stop()
    assert_same(raw, predictor.predict([("red.png", png())], topk=2))
    assert_same(decoded, predictor.predict([("blue.png", png((0, 0, 200), (9, 31)))], topk=2))


def test_a_model_the_child_cannot_load_is_refused_with_the_reason(tmp_path):
    missing = tmp_path / "missing.onnx"  # the onnx backend: the child fails without torch
    runner = ModelProcess(PredictorSpec(str(missing), device="cpu"))
    with pytest.raises(ModelProcessError, match="the model process cannot serve: .*missing.onnx"):
        runner.start()
    assert runner.process is None  # nothing left running


def test_a_child_that_dies_mid_batch_fails_that_batch_and_is_replaced(runner, predictor, alive):
    first = runner.pid
    batcher = Batcher(predictor, max_batch=8, max_wait_ms=0, runner=runner)
    batcher.start()
    try:
        alive.unlink()  # the next forward pass ends the process
        doomed = batcher.submit([("a.png", png())])
        with pytest.raises(ModelProcessError, match=r"died \(exit code 3\).*restarted"):
            doomed.result(120)
        after = batcher.submit([("a.png", png())], topk=2).result(120)  # a new child answers
    finally:
        batcher.stop()
    assert runner.pid not in (None, first)
    assert_same(after, predictor.predict([("a.png", png())], topk=2))


def test_a_child_killed_while_idle_is_replaced_before_the_next_batch(runner, predictor):
    first = runner.pid
    os.kill(first, signal.SIGKILL)
    runner.process.join(30)  # dead (and reaped, as the next is_alive would)
    outcomes, images = runner([([("a.png", png())], None, 2)])  # no request fails
    assert runner.pid != first
    assert images == 1
    assert_same(outcomes[0], predictor.predict([("a.png", png())], topk=2))


def test_the_child_ends_when_the_server_is_killed(smoke_model):
    """serve.py's default worker is a child process, gone when the server is killed (its
    pipe closes; the runner fixture checks that it stops when asked)."""
    import httpx

    from load import start_server, stop_server

    server, url = start_server(str(smoke_model))
    try:
        children = psutil.Process(server.pid).children()  # + multiprocessing's tracker
        assert sum("spawn_main" in " ".join(c.cmdline()) for c in children) == 1, children
        response = httpx.post(f"{url}/predict", files={"files": ("a.png", png())}, timeout=60)
        assert response.status_code == 200
        server.kill()
    finally:
        stop_server(server)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, "a child of the killed server is still running"


def test_the_api_answers_503_for_the_batch_of_a_dying_child_then_serves(smoke_model, tmp_path):
    """create_app with a model process: a request whose batch killed it gets 503 with
    Retry-After and the reason; the next is answered by a new one; stopping the app stops it."""
    from fastapi.testclient import TestClient

    from serve import create_app

    alive = tmp_path / "alive"
    spec = ExitingSpec(str(smoke_model), device="cpu", threads=1, alive=str(alive))
    app = create_app(smoke_model, device="cpu", model_process=spec)
    files = {"files": ("a.png", png(), "image/png")}
    with TestClient(app) as client:  # the lifespan starts the model process
        batcher = app.state.batcher
        died = client.post("/predict", files=files)
        answered = client.post("/predict", files=files)
        child = batcher.runner.process
    assert died.status_code == 503 and died.headers["Retry-After"] == "1"
    assert "the model process died (exit code 3)" in died.json()["detail"]
    assert answered.status_code == 200, answered.text
    assert answered.json()["predictions"][0]["predicted"] is not None
    assert child is not None and child.exitcode == 0  # stopped with the app


def test_a_failed_forward_pass_fails_only_the_requests_that_needed_it(predictor, monkeypatch):
    from batching import run_batch

    def broken(batch):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(predictor, "logits", broken)
    unreadable = [("empty.png", b""), ("text.png", b"hello")]
    outcomes, images = run_batch(predictor, [([("a.png", png())], None, 1), (unreadable, None, 1)])
    assert isinstance(outcomes[0], RuntimeError) and str(outcomes[0]) == "out of memory"
    assert [p.source for p in outcomes[1]] == ["empty.png", "text.png"]
    assert all(p.error for p in outcomes[1])
    assert images == 0
