"""Shared fixtures: generated image folders and one smoke-trained model per test session."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "source"))
os.environ.setdefault("MPLBACKEND", "Agg")
# Tiny test models run far faster on one thread (less overhead than work); subprocesses
# (train.py runs, servers) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


# The slowest test files, slowest first (seconds of test time per file in `pytest -n logical
# --durations=0` on 2 cores, 2026-12-02: 145, 132, 96, 63, 62, 61 ... 28). `make test` gives
# each of its xdist workers one whole file at a time in collection order (--dist loadfile
# --no-loadscope-reorder); starting the long files first keeps a worker from idling for
# minutes while the other ends on one. The rest follow in their usual order.
SLOWEST_FIRST = (
    "test_load.py", "test_model_process.py", "test_export.py", "test_tracking.py",
    "test_multinode.py", "test_notebook.py", "test_serve.py", "test_benchmarks.py",
    "test_transfer_benchmark.py", "test_learning_benchmark.py", "test_training.py",
    "test_reliability.py", "test_deploy.py", "test_serving_onnx.py", "test_browser.py",
)  # fmt: skip


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Back to one thread after each module, whatever a test (a train.py run) set."""
    yield
    torch.set_num_threads(1)


@pytest.fixture
def sigterm_guard():
    """train.main installs a SIGTERM handler and leaves it; give the process its own back."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def make_image(path: Path, label: int, size: int = 20, seed: int = 0) -> Path:
    """A small RGB image whose colour and stripe depend on the label, so classes are learnable."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    arr[..., label % 3] += 150
    arr[(label * 5) % size : (label * 5) % size + 4, :, :] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_class_folders(root: Path, classes=("cat", "dog", "owl"), per_class: int = 12) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"{i:03d}.png", c, seed=c * 1000 + i)
    return root


@pytest.fixture
def class_folders(tmp_path) -> Path:
    """root/<class>/<image>.png, three classes of 12 images."""
    return make_class_folders(tmp_path / "flat")


@pytest.fixture
def split_folders(tmp_path) -> Path:
    """root/train|valid|test/<class>/<image>.png, Kaggle-birds style."""
    root = tmp_path / "birds"
    for split, n in (("train", 10), ("valid", 3), ("test", 3)):
        make_class_folders(root / split, per_class=n)
    return root


def train_preset(tmp: Path, preset: str, *extra: str, run_name: str | None = None) -> Path:
    """Train `preset` with every output under tmp/; returns the model path."""
    import train

    model = tmp / "models" / "model.pth"
    argv = [
        "--preset", preset,
        "--model-path", str(model),
        "--results-dir", str(tmp / "results"),
        "--classes-path", str(tmp / "classes.txt"),
        "--runs-dir", str(tmp / "runs"),
        "--run-name", run_name or preset,
        *extra,
    ]  # fmt: skip
    assert train.main(argv) == 0
    return model


def train_smoke(tmp: Path, *extra: str) -> Path:
    """Train the smoke preset into tmp/; returns the model path."""
    return train_preset(tmp, "smoke", *extra)


@pytest.fixture(scope="session")
def smoke_model(tmp_path_factory) -> Path:
    """A smoke-trained digits model (trained once per test session); do not modify it."""
    return train_smoke(tmp_path_factory.mktemp("smoke"))
