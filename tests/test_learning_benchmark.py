"""benchmarks/learning.py works end to end in quick mode (that it works, not how well)."""

from __future__ import annotations

import json
import tarfile

import pytest

import learning
from conftest import make_class_folders


@pytest.fixture(scope="module")
def dev_tar(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dev")
    images = make_class_folders(tmp / "src" / "cifar10-dev", per_class=10)
    tar = tmp / "dev.tar.gz"
    with tarfile.open(tar, "w:gz") as archive:
        archive.add(images, arcname="cifar10-dev")
    return tar


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, dev_tar):
    """One `--quick --slow-minutes 0.05` run (the quick budget and its --threads 1 twin, and
    the throughput before them) for the tests of what quick mode writes: its results folder."""
    out = tmp_path_factory.mktemp("quick") / "results"
    args = ["--quick", "--slow-minutes", "0.05", "--tar", str(dev_tar), "--out", str(out)]
    assert learning.main(args) == 0
    return out


@pytest.mark.slow
def test_learning_benchmark_quick(quick_run):
    out = quick_run
    table = (out / "learning.md").read_text()
    assert "| budget (min) | test accuracy |" in table
    data = json.loads((out / "learning.json").read_text())
    # Quick mode's one budget, 0.05 minutes on the preset's threads (the --threads 1 row is
    # --slow-minutes's, tested below).
    preset = [r for r in data["budgets"] if r["threads"] == "preset"]
    assert len(preset) == 1 and preset[0]["minutes"] == 0.05
    assert 0.0 <= preset[0]["test_accuracy"] <= 1.0
    assert (out / "learning.png").stat().st_size > 1000
    log = (out / "learning-logs" / "budget-0.05.log").read_text()  # train.py's own output
    assert log.count("\nepoch   1  train loss ") == 1 and "test accuracy" in log


@pytest.mark.slow
def test_ablation_quick_adds_one_element_a_row(tmp_path, dev_tar):
    out = tmp_path / "results"
    assert learning.main(["--quick", "--ablation", "--tar", str(dev_tar), "--out", str(out)]) == 0
    rows = json.loads((out / "learning-ablation.json").read_text())
    assert [r["recipe"] for r in rows] == [label for label, _ in learning.ABLATION[:2]]
    assert rows[1]["args"][-2:] == ["--label-smoothing", "0.1"]  # cumulative flags
    assert "--tokenizer" in rows[1]["args"]
    text = (out / "learning-ablation.md").read_text()
    assert "| recipe | test accuracy | change | epochs |" in text
    assert not (out / "learning.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("forked", [True, False], ids=["forked", "subprocess"])
def test_a_failed_run_ends_with_train_py_s_error(tmp_path, forked):
    """Measured runs are `python source/train.py` subprocesses, --quick's fork from a server
    (learning.train_server): either way a failure names the command and shows train.py's own
    error message."""
    error = r"(?s)training failed \(.*train\.py --no-such-option.*valid config options are"
    with pytest.raises(SystemExit, match=error):
        learning.run_train(["--no-such-option", "1"], tmp_path, "bad", forked=forked)


def test_missing_archive_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not found; pass --tar"):
        learning.main(["--quick", "--tar", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path)])


def test_loader_mode_measures_both_rates(tmp_path):
    """--loader mode measures both rates and writes them (speed itself is for the benchmark)."""
    images = make_class_folders(tmp_path / "data", per_class=20)
    out = tmp_path / "results"
    args = ["--loader", "--quick", "--data", str(images), "--out", str(out)]
    assert learning.main(args) == 0
    text = (out / "loader.md").read_text()
    assert "images/s from the loader" in text and "training step" in text


@pytest.mark.slow
def test_quick_with_a_threads1_row_and_the_throughput(quick_run):
    out = quick_run
    data = json.loads((out / "learning.json").read_text())
    rows = data["budgets"]
    assert [(r["minutes"], r["threads"]) for r in rows] == [(0.05, "preset"), (0.05, "1")]
    assert rows[1]["args"][-2:] == ["--threads", "1"]
    assert (out / "learning-logs" / "budget-0.05-threads1.log").is_file()
    assert data["images"] == 30
    speed = data["throughput"]
    assert speed["matmul_gflops"] > 0 and speed["images_per_s"] > 0
    achieved = speed["images_per_s"] * speed["train_mflop_per_image"] / 1e3
    assert speed["train_gflops"] == pytest.approx(achieved, rel=1e-9)
    assert speed["fraction_of_matmul"] == pytest.approx(
        speed["train_gflops"] / speed["matmul_gflops"], rel=1e-9
    )
    table = (out / "learning.md").read_text()
    assert "% of the machine's fp32 matmul rate" in table
    assert table.rstrip().splitlines()[-1].endswith("| 1 |")


def test_training_flops_count_each_block_three_times_its_forward_products():
    """A block's forward is 2*N*D*(3D + D + 2H) for its linear layers plus 4*N*N*D for
    attention (QK^T and AV); the backward is twice the forward, as FlopCounterMode counts it."""
    from pathlib import Path

    cfg = learning.preset_config(Path("unused"), [])
    n, d, h = (
        (cfg.image_size // cfg.patch_size) ** 2 + 1,
        cfg.embed_dim,
        int(cfg.embed_dim * cfg.mlp_ratio),
    )
    block = 2 * n * d * (3 * d + d + 2 * h) + 4 * n * n * d
    deeper = learning.preset_config(Path("unused"), ["--depth", str(cfg.depth + 1)])
    difference = learning.train_flops_per_image(deeper, 10) - learning.train_flops_per_image(
        cfg, 10
    )
    assert difference == pytest.approx(3 * block, rel=1e-9)
