"""Surviving kills and bad input (issue 9): SIGTERM and resume, SIGKILL during a checkpoint
write, and the bad-file corpus through dataset loading and decoding. (torchrun's two
processes against one: tests/test_multinode.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import preprocessing as P
from badfiles import make_corpus
from config import Config
from conftest import ROOT, make_class_folders

PY = sys.executable


def train_args(tmp: Path, name: str, *extra: str) -> list[str]:
    # One thread: two spin-waiting threads per process burn three times the CPU of one on
    # this tiny model when another run shares the cores.
    return [
        "--preset", "smoke", "--tracker", "none", "--threads", "1",
        "--epochs", "4", "--limit-train-batches", "12", "--batch-size", "16",
        "--model-path", str(tmp / name / "model.pth"), "--results-dir", str(tmp / name / "r"),
        "--classes-path", str(tmp / name / "classes.txt"), "--runs-dir", str(tmp / "runs"),
        *extra,
    ]  # fmt: skip


def train_cmd(tmp: Path, name: str, *extra: str) -> list[str]:
    return [PY, str(ROOT / "source" / "train.py"), *train_args(tmp, name, *extra)]


def final_weights(tmp: Path, name: str) -> dict:
    state = torch.load(tmp / name / "model.resume.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 4
    return state["model"]


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_matches_uninterrupted(tmp_path, sigterm_guard):
    import train

    proc = subprocess.Popen(
        train_cmd(tmp_path, "killed"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # Interrupt once the first epoch has ended: three epochs (about 1.5 s here) are left, so
    # the signal lands mid-run however fast the machine is; a fixed sleep did not.
    for line in proc.stdout:
        if line.startswith("epoch   1"):
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out, out[-2000:]
    state = torch.load(
        tmp_path / "killed" / "model.resume.pth", map_location="cpu", weights_only=True
    )
    assert (1, 0) <= (state["epoch"], state["batch"]) < (4, 0)
    with open(tmp_path / "resumed.log", "w") as sink:  # a file: no pipe fills up and blocks
        resumed = subprocess.Popen(
            train_cmd(tmp_path, "killed", "--resume", "true"),
            stdout=sink, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        # The uninterrupted run, in this process (one interpreter start fewer) while the
        # resumed one starts up beside it, under a run name of its own: both would take the
        # same time-stamped one in tmp/runs.
        assert train.main(train_args(tmp_path, "straight", "--run-name", "straight")) == 0
        assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    finally:
        if resumed.poll() is None:  # a failure above: not left running
            resumed.kill()
    assert "\nresumed " in (tmp_path / "resumed.log").read_text()
    a, b = final_weights(tmp_path, "straight"), final_weights(tmp_path, "killed")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_without_state_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """`python source/train.py --resume true` with no resume file: exit status 2 and one
    sentence. Run as __main__ in this process: the script's own guard and exit status, without
    a fresh interpreter importing torch again."""
    import runpy

    script = ROOT / "source" / "train.py"
    monkeypatch.setattr(
        sys, "argv", [str(script), *train_args(tmp_path, "none", "--resume", "true")]
    )
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "no resume file" in err


WRITER = """
import sys, time, torch
sys.path.insert(0, sys.argv[2])
from checkpoint import atomic_save
atomic_save({"version": torch.tensor(1)}, sys.argv[1])
print("first", flush=True)
big = {"version": torch.tensor(2), "payload": torch.zeros(300_000_000, dtype=torch.uint8)}
while True:
    atomic_save(big, sys.argv[1])
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_file(tmp_path):
    target = tmp_path / "model.pth"
    proc = subprocess.Popen(
        [PY, "-c", WRITER, str(target), str(ROOT / "source")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "first"
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".model.pth.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL in the middle of writing the temporary file
    proc.wait()
    loaded = torch.load(target, weights_only=True)
    assert int(loaded["version"]) in (1, 2)  # the old file, or a complete new one
    if int(loaded["version"]) == 2:
        assert loaded["payload"].numel() == 300_000_000


# torchrun with two processes against one process: tests/test_multinode.py, whose launches of
# the same run on one node and on two nodes it shares.


# ---- bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("bad"))


def test_decode_image_on_the_corpus(corpus):
    for name, (path, expected) in corpus.items():
        if expected == "refused":
            with pytest.raises(P.ImageError) as err:
                P.decode_image(path)
            assert str(path) in str(err.value), name
            continue
        image = P.decode_image(path)
        assert image.mode == "RGB", name
    cmyk = P.decode_image(corpus["cmyk"][0]).getpixel((5, 5))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # red stays red
    assert P.decode_image(corpus["gray16"][0]).getpixel((3, 3))[0] in range(120, 136)
    assert P.decode_image(corpus["palette_alpha"][0]).getpixel((3, 3)) == (0, 0, 255)
    assert P.decode_image(corpus["animated"][0]).getpixel((3, 3)) == (0, 255, 0)  # frame 1
    assert P.decode_image(corpus["exif_rotated"][0]).size == (30, 60)  # rotated upright
    assert P.decode_image(corpus["one_pixel"][0]).size == (1, 1)


def test_dataset_loading_skips_bad_files_and_keeps_the_rest(tmp_path, corpus, caplog):
    root = make_class_folders(tmp_path / "data", per_class=10)
    for path, _ in corpus.values():
        shutil.copy(path, root / "cat" / path.name)
    cfg = Config(data=str(root), image_size=16, patch_size=4, cache_images=False)
    splits = P.load_splits(cfg)
    refused = {n for n, (_, e) in corpus.items() if e == "refused"}
    skipped = " ".join(splits.skipped)
    for name in refused:
        assert corpus[name][0].name in skipped, name
    assert len(splits.skipped) == len(refused)
    assert "skipped 5 unreadable file(s)" in caplog.text
    total = len(splits.train) + len(splits.val) + len(splits.test)
    assert total == 30 + len(corpus) - len(refused)
    P.with_transforms(splits, cfg)
    for i in range(len(splits.train)):  # every kept file decodes and transforms
        image, _ = splits.train[i]
        assert image.shape == (3, 16, 16)


def test_atomic_save_gives_a_readable_file_mode(tmp_path):
    from checkpoint import atomic_save

    atomic_save({"a": torch.ones(1)}, tmp_path / "model.pth")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.pth").stat().st_mode & 0o777 == 0o666 & ~umask
