"""Experiment tracking: MLflow (a real SQLite store and a real server), Neptune offline, and
every way a tracker can fail while training goes on with a complete local record."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import tracking
import tracking_mlflow
from config import Config
from conftest import ROOT, train_smoke

# One epoch and one evaluation batch: enough to go through every tracker call of train.py.
FAST = ("--epochs", "1", "--limit-eval-batches", "1")
ARTIFACTS = ["accuracy_loss.png", "classes.txt", "model.pth"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metric_histories(run_dir: Path) -> dict:
    """{name: [(step, value), ...]} of the numeric metrics in the local metrics.jsonl."""
    out = defaultdict(list)
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        for key, value in record.items():
            if key not in ("step", "time"):
                out[key].append((record["step"], float(value)))
    return dict(out)


def tracker_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tracking"]


def library_warnings(caplog) -> list[str]:
    noisy = ("mlflow", "urllib3", "neptune", "alembic")
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.split(".")[0] in noisy
    ]


def assert_local_record_complete(tmp: Path, tracker: str) -> Path:
    run_dir = tmp / "runs" / "smoke"
    assert json.loads((run_dir / "config.json").read_text())["tracker"] == tracker
    assert json.loads((run_dir / "params.json").read_text())["tracker"] == tracker
    keys = set().union(*read_jsonl(run_dir / "metrics.jsonl"))
    assert {"epoch/train_loss", "epoch/val_accuracy", "best_val/accuracy", "test/accuracy"} <= keys
    assert sorted(p.name for p in (run_dir / "artifacts").iterdir()) == ARTIFACTS
    model = run_dir / "artifacts" / "model.pth"
    assert model.read_bytes() == (tmp / "models" / "model.pth").read_bytes()
    tags = json.loads((run_dir / "tags.json").read_text())
    assert tags["status"] == "FINISHED" and tags["preset"] == "smoke" and tags["data"] == "digits"
    assert json.loads((run_dir / "tracker.json").read_text()) == {
        "backend": "none",
        "run_id": "smoke",
    }
    return run_dir


# ---- pure helpers --------------------------------------------------------------------------


def test_mlflow_keys_and_params_are_valid_for_mlflow():
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    for name in ("train/loss", "val acc@1 (top)", "a//b", "/lead/", "x:y", "../up", "é/ü", "."):
        key = tracking_mlflow.mlflow_key(name)
        assert validate_param_and_metric_name(key) and ":" not in key, key
        assert not path_not_unique(key), key
    assert tracking_mlflow.mlflow_key("train/loss") == "train/loss"
    assert tracking_mlflow.mlflow_key("val acc@1") == "val acc_1"
    assert tracking_mlflow.mlflow_key("/a//b/") == "a/b"
    assert tracking_mlflow.mlflow_param((0.5, 0.5, 0.5)) == "(0.5, 0.5, 0.5)"
    assert tracking_mlflow.mlflow_param("x" * 7000) == "x" * 6000
    assert tracking.flatten({"a": 1, "b": {"c": 2, "d": {"e": 3}}}) == {
        "a": 1,
        "b/c": 2,
        "b/d/e": 3,
    }


def test_redact_hides_credentials(monkeypatch):
    monkeypatch.setenv("NEPTUNE_API_TOKEN", "tok-SECRET-123")
    assert tracking.redact("http://bob:pw@host:5000/x") == "http://***@host:5000/x"
    assert tracking.redact("token tok-SECRET-123 rejected") == "token *** rejected"


class FlakyBackend(tracking.Tracker):
    """Fails on its third call, like a server that goes down mid-run."""

    name = "flaky"

    def __init__(self):
        self.calls = []

    def _record(self, *args):
        self.calls.append(args)
        if len(self.calls) == 3:
            raise ConnectionError("server went away")

    log_params = log_metrics = log_artifact = set_tags = finish = _record


def test_a_backend_failing_mid_run_is_switched_off_with_one_warning(tmp_path, caplog):
    backend = FlakyBackend()
    run = tracking.Fanout(tracking.LocalRecord(tmp_path / "run"), backend)
    run.log_params({"lr": 0.1})
    for step in range(1, 6):
        run.log_metrics({"train/loss": 1.0 / step}, step)
    run.log_artifact(tmp_path / "run" / "params.json")
    run.finish()
    assert len(backend.calls) == 3  # nothing is sent after the failure
    warnings = tracker_warnings(caplog)
    assert len(warnings) == 1 and "flaky tracking stopped (ConnectionError" in warnings[0]
    assert "local record" in warnings[0]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "artifacts" / "params.json").is_file()
    assert run.summary().startswith("tracking: flaky stopped during the run")


def test_import_tracking_loads_no_backend():
    code = "import sys, tracking; print(sorted(m for m in sys.modules if 'mlflow' in m or 'neptune' in m))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT / "source",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_log_model_is_a_no_op_without_a_model_format_and_never_stops_training(tmp_path, caplog):
    local = tracking.make_tracker(Config(tracker="none"), tmp_path / "none", "none")
    assert local.log_model(tmp_path / "model.pth", register_name="vit") == ""
    local.finish()

    class Broken(FlakyBackend):
        def log_model(self, *args, **kwargs):
            raise RuntimeError("registry is read-only")

    backend = Broken()
    run = tracking.Fanout(tracking.LocalRecord(tmp_path / "run"), backend)
    assert run.log_model(tmp_path / "model.pth", register_name="vit") == ""
    assert tracker_warnings(caplog) == [
        "flaky could not log the model (RuntimeError: registry is read-only); the checkpoint "
        "is among the run's artifacts"
    ]
    run.log_metrics({"train/loss": 1.0}, 1)
    assert run.backend is backend and len(backend.calls) == 1  # still on


def test_resolve_model_uri_passes_paths_through(tmp_path):
    assert tracking_mlflow.resolve_model_uri("metadata/models/model.pth") == Path(
        "metadata/models/model.pth"
    )
    assert tracking_mlflow.resolve_model_uri(tmp_path / "m.pth") == tmp_path / "m.pth"
    with pytest.raises(tracking_mlflow.ModelUriError, match="holds no checkpoint artifact"):
        tracking_mlflow.checkpoint_in_model(tmp_path)


def test_local_run_reopened_for_evaluation_appends_and_keeps_its_status(tmp_path):
    cfg = Config(tracker="none")
    train = tracking.make_tracker(cfg, tmp_path / "runs" / "exp1", "exp1")
    train.log_params({"lr": 0.1})
    train.log_metrics({"epoch/val_accuracy": 0.5}, 10)
    train.finish("KILLED")
    assert train.summary() == f"tracking: local record in {tmp_path / 'runs' / 'exp1'} only"

    with tracking.open_run("none", run_id="exp1", runs_dir=str(tmp_path / "runs")) as run:
        assert run.run_dir == tmp_path / "runs" / "exp1" and run.run_id == "exp1"
        run.log_params({"split": "test"})
        run.log_metrics({"eval/test/accuracy": 0.75}, 0)
    run_dir = tmp_path / "runs" / "exp1"
    assert [sorted(r) for r in read_jsonl(run_dir / "metrics.jsonl")] == [
        ["epoch/val_accuracy", "step", "time"],
        ["eval/test/accuracy", "step", "time"],
    ]
    assert json.loads((run_dir / "params.json").read_text()) == {"lr": 0.1, "split": "test"}
    assert json.loads((run_dir / "tags.json").read_text())["status"] == "KILLED"

    new = tracking.open_run("none", runs_dir=str(tmp_path / "runs"))
    new.finish()
    assert new.run_dir.name.startswith("evaluation-") and new.run_dir.parent == tmp_path / "runs"
    assert (new.run_dir / "metrics.jsonl").is_file()
    with pytest.raises(ValueError, match="unknown tracker 'wandb'; use one of mlflow, neptune"):
        tracking.open_run("wandb")


# ---- MLflow: a real SQLite store -----------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its tables takes about 15 s here."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory, mlflow_uri) -> Path:
    """A smoke training run tracked in the SQLite store, train/* logged at every step."""
    tmp = tmp_path_factory.mktemp("mlflow-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        train_smoke(tmp, "--tracker", "mlflow", "--log-every", "1")
    return tmp


@pytest.mark.slow
def test_mlflow_run_matches_the_local_record(mlflow_uri, mlflow_run, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    run_dir = mlflow_run / "runs" / "smoke"
    info = json.loads((run_dir / "tracker.json").read_text())
    assert info["backend"] == "mlflow" and info["tracking_uri"] == mlflow_uri
    assert info["experiment"] == tracking_mlflow.DEFAULT_EXPERIMENT
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke"

    # Every config value is a param; tuples as strings.
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    assert run.data.params == {key: str(value) for key, value in cfg.to_dict().items()}
    assert run.data.params["mean"] == "(0.5, 0.5, 0.5)"
    assert run.data.params["tracker"] == "mlflow"

    # Every metric history equals the local one, step for step.
    local = metric_histories(run_dir)
    assert len(local["train/loss"]) == len(local["train/lr"]) == 8  # 2 epochs x 4 batches
    assert len(local["epoch/val_accuracy"]) == 2
    assert {"best_val/accuracy", "test/accuracy", "test/f1_macro"} <= set(local)
    assert set(run.data.metrics) == set(local)
    for key, expected in local.items():
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted((m.step, m.value) for m in history) == sorted(expected), key

    # Tags: preset, dataset and the system facts.
    tags = run.data.tags
    assert tags["preset"] == "smoke" and tags["data"] == "digits"
    assert tags["device"] == "cpu" and tags["num_classes"] == "10"
    for key in ("torch", "git_commit", "num_params", "train_size", "val_size", "test_size"):
        assert key in tags

    # Artifacts, beside the database, byte for byte.
    db_dir = Path(mlflow_uri[len("sqlite:///") :]).parent
    assert run.info.artifact_uri.startswith((db_dir / "mlartifacts").as_uri())
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ARTIFACTS
    model = client.download_artifacts(run.info.run_id, "model.pth", str(tmp_path))
    assert Path(model).read_bytes() == (mlflow_run / "models" / "model.pth").read_bytes()


@pytest.mark.slow
def test_open_run_logs_evaluation_into_the_training_run(
    mlflow_uri, mlflow_run, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    run_dir = mlflow_run / "runs" / "smoke"
    info_before = (run_dir / "tracker.json").read_text()
    run_id = json.loads(info_before)["run_id"]
    report = tmp_path / "classification_report.txt"
    report.write_text("precision recall\n")

    with tracking.open_run("mlflow", run_id=run_id, runs_dir=str(mlflow_run / "runs")) as run:
        assert run.name == "mlflow" and run.run_id == run_id and run.run_dir == run_dir
        run.log_metrics({"eval/test/accuracy": 0.75}, 0)
        run.log_artifact(report)

    client = MlflowClient(mlflow_uri)
    reopened = client.get_run(run_id)
    assert reopened.data.metrics["eval/test/accuracy"] == 0.75
    assert reopened.info.status == "FINISHED"
    assert "classification_report.txt" in {a.path for a in client.list_artifacts(run_id)}
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["eval/test/accuracy"] == 0.75
    assert (run_dir / "tracker.json").read_text() == info_before


@pytest.mark.slow
def test_open_run_without_id_starts_an_evaluation_run(mlflow_uri, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    run = tracking.open_run("mlflow", runs_dir=str(tmp_path / "runs"))
    run.log_metrics({"test/accuracy": 0.5}, 0)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(tmp_path / "confusion_matrix.png")
    plt.close(fig)
    run.log_artifact(tmp_path / "confusion_matrix.png")
    run.finish()

    client = MlflowClient(mlflow_uri)
    created = client.get_run(run.run_id)
    assert created.info.run_name.startswith("evaluation-")
    assert run.run_dir == tmp_path / "runs" / created.info.run_name
    assert created.data.metrics == {"test/accuracy": 0.5}
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["confusion_matrix.png"]
    assert (run.run_dir / "artifacts" / "confusion_matrix.png").is_file()
    assert json.loads((run.run_dir / "tracker.json").read_text())["run_id"] == run.run_id


@pytest.mark.slow
def test_resumed_training_continues_the_same_mlflow_run(mlflow_uri, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    run_dir = tmp_path / "runs" / "long"
    first = tracking.make_tracker(Config(tracker="mlflow"), run_dir, "long")
    first.log_params({"epochs": 30, "resume": False})
    first.log_metrics({"train/loss": 2.0}, 1)
    first.finish("KILLED")  # SIGTERM: the resume state is saved, the run stops

    second = tracking.make_tracker(Config(tracker="mlflow", resume=True), run_dir, "long")
    assert second.run_id == first.run_id
    assert MlflowClient(mlflow_uri).get_run(second.run_id).info.status == "RUNNING"
    second.log_params({"epochs": 30, "resume": True})  # a changed value must not break it
    second.log_metrics({"train/loss": 1.0}, 2)
    second.finish()
    assert second.backend is not None
    client = MlflowClient(mlflow_uri)
    assert client.get_run(second.run_id).info.status == "FINISHED"
    history = client.get_metric_history(second.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0)]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_make_mlflow_ui_opens_the_default_store():
    makefile = (ROOT / "Makefile").read_text()
    target = makefile[makefile.index("\nmlflow-ui:") :].split("\n\n")[0]
    assert f"--backend-store-uri {tracking_mlflow.DEFAULT_MLFLOW_URI}" in target


# ---- MLflow: a real tracking server ---------------------------------------------------------


def start_mlflow_server(
    backend_uri: str, artifacts: Path, log_file: Path, where: str = "--artifacts-destination"
):
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", backend_uri]
        + [where, str(artifacts), "--host", "127.0.0.1"]
        + ["--port", str(port), "--workers", "1"],
        stdout=log_file.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # one process less
        start_new_session=True,  # its workers are stopped with it
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # 10-20 s on an idle machine, a minute under load
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log_file.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server not healthy in 180 s: {log_file.read_text()[-2000:]}")


def stop_server(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_mlflow_server_through_its_uri_and_going_down_mid_run(
    mlflow_uri, tmp_path, monkeypatch, caplog
):
    from mlflow.tracking import MlflowClient

    proc, url = start_mlflow_server(mlflow_uri, tmp_path / "served", tmp_path / "server.log")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "served")  # created by the server
        cfg = Config(tracker="mlflow", run_name="served")
        artifact = tmp_path / "classes.txt"
        artifact.write_text("cat\ndog\n")
        run = tracking.make_tracker(cfg, tmp_path / "runs" / "served", "served")
        run.log_params(cfg.to_dict())
        run.set_tags({"preset": "smoke", "data": "digits"})
        for step in range(1, 6):
            run.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.001}, step)
        run.log_artifact(artifact)
        run.finish()
        assert run.backend is not None and url in run.summary()

        client = MlflowClient(url)
        served = client.get_run(run.run_id)
        assert served.info.status == "FINISHED" and served.info.run_name == "served"
        assert served.data.params["tracker"] == "mlflow" and served.data.tags["preset"] == "smoke"
        history = client.get_metric_history(run.run_id, "train/loss")
        assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 6)]
        # Artifacts go through the server's proxy into its --artifacts-destination.
        assert served.info.artifact_uri.startswith("mlflow-artifacts:")
        copy = client.download_artifacts(run.run_id, "classes.txt", str(tmp_path / "dl"))
        assert Path(copy).read_text() == "cat\ndog\n"
        assert [p.read_text() for p in (tmp_path / "served").rglob("classes.txt")] == ["cat\ndog\n"]

        # The server goes down mid-run: one warning, no long hang, a complete local record.
        down = tracking.make_tracker(cfg, tmp_path / "runs" / "down", "down")
        down.log_metrics({"train/loss": 1.0}, 1)
    finally:
        stop_server(proc)
    caplog.clear()
    start = time.monotonic()
    for step in range(2, 6):
        down.log_metrics({"train/loss": 1.0 / step}, step)
    down.log_artifact(artifact)
    down.finish()
    assert time.monotonic() - start < 30
    warnings = tracker_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith("mlflow tracking stopped"), warnings
    assert library_warnings(caplog) == []
    local = tmp_path / "runs" / "down"
    assert [r["step"] for r in read_jsonl(local / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert (local / "artifacts" / "classes.txt").read_text() == "cat\ndog\n"
    assert json.loads((local / "tags.json").read_text())["status"] == "FINISHED"
    assert "mlflow stopped during the run" in down.summary()


def png_bytes(image) -> bytes:
    from torchvision.transforms import v2

    buffer = io.BytesIO()
    v2.functional.to_pil_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


def start_model_server(model_uri: str, log_file: Path):
    """`mlflow models serve` in this environment (no conda); (process, url) once it answers."""
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "models", "serve", "-m", model_uri, "--env-manager", "local"]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log_file.open("w"),
        stderr=subprocess.STDOUT,
        # It starts `uvicorn` from PATH: this environment's, as an activated venv would.
        env={**os.environ, "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ['PATH']}"},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited: {log_file.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow models serve not up in 120 s: {log_file.read_text()[-2000:]}")


@pytest.mark.slow
def test_best_model_is_registered_loaded_and_served_by_mlflow(
    mlflow_uri, smoke_model, tmp_path, monkeypatch
):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    import preprocessing as P
    from checkpoint import config_from_checkpoint, load_checkpoint
    from predict import Predictor

    cfg = config_from_checkpoint(load_checkpoint(smoke_model))
    images = [png_bytes(image) for image in P.load_splits(cfg).test.images[:24]]
    (tmp_path / "digit.png").write_bytes(images[0])
    predictor = Predictor(smoke_model, device="cpu")
    expected = predictor.predict(images + [tmp_path / "digit.png"], topk=1)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"stands in for the ONNX export: attached to the model, not run")
    uri = "models:/vit-smoke@candidate"
    server, url = start_mlflow_server(
        mlflow_uri, tmp_path / "art", tmp_path / "server.log", "--default-artifact-root"
    )
    serving = None
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "registry")
        logged = []
        for name, attached in (("first", None), ("second", onnx)):
            run = tracking.make_tracker(Config(tracker="mlflow"), tmp_path / "runs" / name, name)
            logged.append(run.log_model(smoke_model, onnx_path=attached, register_name="vit-smoke"))
            run.finish()
        assert logged == [f"{uri} (version 1)", f"{uri} (version 2)"]
        client = MlflowClient(url)
        version = client.get_model_version_by_alias("vit-smoke", "candidate")
        assert version.version == "2" and version.run_id == run.run_id  # the alias moved

        # The registered model predicts what Predictor predicts: bytes and paths alike.
        model = mlflow.pyfunc.load_model(uri)
        out = model.predict(pd.DataFrame({"image": images + [str(tmp_path / "digit.png")]}))
        assert list(out.columns) == ["label", "probability", "error"]
        assert out["label"].tolist() == [p.predicted for p in expected]
        np.testing.assert_allclose(out["probability"], [p.probability for p in expected])
        assert out["error"].isna().all()
        assert model.predict(images[:3])["label"].tolist() == out["label"].tolist()[:3]
        bad = model.predict(pd.DataFrame({"image": [b"not an image"]}))
        assert bad["label"].isna().all() and bad["error"].notna().all()

        # The checkpoint and the ONNX file are the model's artifacts; the app and API get a path.
        checkpoint = tracking_mlflow.resolve_model_uri(uri, tmp_path / "download")
        assert checkpoint.read_bytes() == smoke_model.read_bytes()
        assert (checkpoint.parent / "model.onnx").read_bytes() == onnx.read_bytes()
        code = {p.name for p in (tmp_path / "download" / "code").iterdir()}
        assert {"predict.py", "mlflow_pyfunc.py", "checkpoint.py"} <= code

        # `mlflow models serve` answers on the loopback: base64 images in, predictions out.
        serving, serve_url = start_model_server(uri, tmp_path / "serve.log")
        body = json.dumps(
            {
                "dataframe_split": {
                    "columns": ["image"],
                    "data": [[base64.b64encode(data).decode()] for data in images[:4]],
                }
            }
        ).encode()
        request = urllib.request.Request(
            f"{serve_url}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())["predictions"]
        assert [row["label"] for row in answer] == [p.predicted for p in expected[:4]]
    finally:
        if serving is not None:
            stop_server(serving)
        stop_server(server)


def test_unreachable_mlflow_server_gives_up_in_seconds(tmp_path, monkeypatch, caplog):
    import mlflow  # noqa: F401 - imported here so that the timing below is the tracker's

    for key in tracking_mlflow.MLFLOW_HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:s3cret-pw@127.0.0.1:{free_port()}")
    start = time.monotonic()
    run = tracking.open_run("mlflow", run_name="offline", runs_dir=str(tmp_path))
    assert time.monotonic() - start < 20
    assert run.backend is None
    warnings = tracker_warnings(caplog)
    assert warnings == [
        "mlflow tracking is off for this run: cannot reach the MLflow tracking server at "
        f"http://***@127.0.0.1:{os.environ['MLFLOW_TRACKING_URI'].rsplit(':', 1)[1]}; start it, "
        "fix MLFLOW_TRACKING_URI, or pass --tracker none. Training goes on with the local "
        f"record in {tmp_path / 'offline'}"
    ]
    assert library_warnings(caplog) == []
    run.finish()
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or b"s3cret-pw" not in path.read_bytes()


# ---- Neptune offline -----------------------------------------------------------------------


def neptune_operations(root: Path) -> list[dict]:
    logs = list((root / ".neptune" / "offline").glob("run__*/data-1.log"))
    assert len(logs) == 1, logs
    return [json.loads(line)["obj"] for line in logs[0].read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Info \\(NVML\\)")  # no GPU: no GPU usage metrics
def test_neptune_offline_records_the_run_and_never_the_token(tmp_path, monkeypatch, capfd, caplog):
    pytest.importorskip("neptune")
    token = f"fake-neptune-token-{uuid.uuid4().hex}"
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    monkeypatch.setenv("NEPTUNE_PROJECT", "workspace/project")
    monkeypatch.setenv("NEPTUNE_API_TOKEN", token)
    monkeypatch.delenv("NEPTUNE_CUSTOM_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # neptune writes .neptune/ into the working directory
    train_smoke(tmp_path, "--tracker", "neptune", "--log-every", "1")

    run_dir = tmp_path / "runs" / "smoke"
    info = json.loads((run_dir / "tracker.json").read_text())
    assert info["backend"] == "neptune" and info["mode"] == "offline"
    ops = neptune_operations(tmp_path)
    assert info["run_id"] == "offline/" + next(tmp_path.glob(".neptune/offline/run__*")).name[5:41]

    def assigned(namespace: str) -> dict:
        return {
            op["path"][1]: op["value"]
            for op in ops
            if op["type"].startswith("Assign") and op["path"][0] == namespace
        }

    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    expected = {k: str(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
    assert assigned("parameters") == expected
    assert assigned("sys")["name"] == "smoke"
    assert assigned("tags")["preset"] == "smoke" and assigned("tags")["data"] == "digits"
    assert assigned("tags")["num_classes"] == "10"
    assert [op["value"] for op in ops if op["path"] == ["status"]] == ["FINISHED"]

    series = defaultdict(list)
    for op in ops:
        if op["type"] == "LogFloats" and op["path"][0] != "monitoring":
            series["/".join(op["path"])] += [(v["step"], v["value"]) for v in op["values"]]
    local = metric_histories(run_dir)
    assert len(local["train/loss"]) == 8
    assert dict(series) == local

    # Uploads point at the run folder's copies, which outlive the run.
    uploads = {
        op["path"][1]: op["file_path"]
        for op in ops
        if op["type"] == "UploadFile" and op["path"][0] == "artifacts"
    }
    assert sorted(uploads) == ARTIFACTS
    for name, path in uploads.items():
        assert Path(path) == (run_dir / "artifacts" / name).resolve()
    assert Path(uploads["model.pth"]).read_bytes() == (tmp_path / "models/model.pth").read_bytes()

    # The token is nowhere: not in params, files, output or log records.
    out, err = capfd.readouterr()
    assert token not in out + err + caplog.text
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or token.encode() not in path.read_bytes(), path
    assert tracker_warnings(caplog) == []


# ---- a tracker that cannot start: one message, training completes --------------------------


def hide_package(monkeypatch, name: str) -> None:
    """Make `import name` (and its submodules) fail as if it were not installed."""
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tracker, problem, expected",
    [
        ("neptune", "no credentials", ["NEPTUNE_PROJECT is not set", "NEPTUNE_MODE=offline"]),
        ("neptune", "no package", ["neptune package is not installed", "pip install neptune"]),
        ("mlflow", "no package", ["mlflow package is not installed", "pip install mlflow"]),
        ("mlflow", "no server", ["cannot reach the MLflow tracking server", "--tracker none"]),
    ],
)
def test_a_tracker_that_cannot_start_leaves_one_message_and_a_complete_record(
    tracker, problem, expected, tmp_path, monkeypatch, caplog
):
    token = f"fake-token-{uuid.uuid4().hex}"
    monkeypatch.setenv("NEPTUNE_API_TOKEN", token)
    monkeypatch.delenv("NEPTUNE_PROJECT", raising=False)
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    monkeypatch.chdir(tmp_path)
    if problem == "no package":
        monkeypatch.setenv("NEPTUNE_MODE", "offline")  # credentials are not the problem
        hide_package(monkeypatch, tracker)
    if problem == "no server":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")

    train_smoke(tmp_path, "--tracker", tracker, *FAST)

    warnings = tracker_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{tracker} tracking is off for this run: ")
    for text in expected:
        assert text in warnings[0]
    assert token not in warnings[0]
    assert library_warnings(caplog) == []
    assert_local_record_complete(tmp_path, tracker)
    assert not (tmp_path / ".neptune").exists()
