"""A small real model for tests that need one that has learned something (int8 accuracy, not
the smoke model at chance level): the digits preset, shorter, trained once per test module.

    from real_model import train_real_digits
    model_path = train_real_digits(tmp_path_factory.mktemp("real"))

The quick-start model at a fifth of its budget: the same shape and data, 12 epochs on one
thread (a test worker has one core: with the preset's two threads this took 167 s in the
suite, against 64 s alone on one thread), and at least 90% test accuracy (asserted, so a test
built on it cannot pass on a model that learned nothing).
"""

from __future__ import annotations

from pathlib import Path

import torch

from checkpoint import load_checkpoint
from conftest import train_preset

EPOCHS = 12
MIN_ACCURACY = 0.90


def train_real_digits(tmp: Path) -> Path:
    """Train the digits preset for EPOCHS epochs into tmp/; returns the model path."""
    extra = ["--epochs", str(EPOCHS), "--max-minutes", "0", "--seed", "0", "--tracker", "none",
             "--threads", "1"]  # fmt: skip
    try:
        model = train_preset(tmp, "digits", *extra, run_name="real-digits")
    finally:
        torch.set_num_threads(1)  # what the tests run on, whatever train.py set
    accuracy = load_checkpoint(model)["metrics"]["test"]["accuracy"]
    assert accuracy >= MIN_ACCURACY, f"the real test model reached only {accuracy:.2%}"
    return model
