"""The training pieces (lr schedule, progress clock, sampler, mixing, EMA, optimizer groups,
SIGTERM) and train.py end to end: outputs, exact resume, NaN stop."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import train

import checkpoint as C
import test as test_script
import training as T
from config import PRESETS, Config
from conftest import make_class_folders, train_smoke
from finetune import param_groups_layer_decay
from transformer import build_model

# ---- learning-rate schedule -----------------------------------------------------------------


def formula(progress: float, lr: float, min_lr: float, warmup: float) -> float:
    if progress < warmup:
        return lr * progress / warmup
    t = (progress - warmup) / (1 - warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2


CFG = Config(lr=1e-3, min_lr=1e-5, warmup_fraction=0.1)


@pytest.mark.parametrize("progress", [0.0, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_get_lr_matches_the_formula(progress):
    assert T.get_lr(progress, CFG) == pytest.approx(formula(progress, 1e-3, 1e-5, 0.1), abs=1e-15)


def test_get_lr_landmarks():
    assert T.get_lr(0.0, CFG) == 0.0
    assert T.get_lr(0.05, CFG) == pytest.approx(5e-4)  # half-way through warmup
    assert T.get_lr(0.1, CFG) == pytest.approx(1e-3)  # warmup end: the peak
    assert T.get_lr(0.55, CFG) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way through decay
    assert T.get_lr(1.0, CFG) == pytest.approx(1e-5)  # the end: min_lr
    assert T.get_lr(1.7, CFG) == pytest.approx(1e-5) and T.get_lr(-1, CFG) == 0.0
    no_warmup = Config(lr=2e-3, min_lr=0.0, warmup_fraction=0.0)
    assert T.get_lr(0.0, no_warmup) == pytest.approx(2e-3)
    assert T.get_lr(0.5, no_warmup) == pytest.approx(1e-3)
    lrs = [T.get_lr(p / 100, CFG) for p in range(101)]
    assert lrs.index(max(lrs)) == 10
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # monotone decay


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_by_steps_without_budget():
    clock = FakeClock()
    progress = T.Progress(total_steps=200, max_minutes=0.0, clock=clock)
    clock.now += 10_000
    assert progress(50) == 0.25
    assert progress(200) == 1.0 and progress(300) == 1.0


def test_progress_follows_the_clock_when_ahead_of_steps():
    clock = FakeClock()
    progress = T.Progress(total_steps=1000, max_minutes=2.0, clock=clock)  # 120 s budget
    assert progress(0) == 0.0
    clock.now += 60
    assert progress(10) == pytest.approx(0.5)  # time ahead of steps
    assert progress(900) == pytest.approx(0.9)  # steps ahead of time
    clock.now += 60
    assert progress(10) == 1.0
    clock.now += 60
    assert progress(10) == 1.0
    assert progress.elapsed == pytest.approx(180)


def test_lr_under_a_time_budget_follows_the_fake_clock():
    cfg = Config(lr=1e-3, min_lr=1e-5, warmup_fraction=0.05, max_minutes=1.0)
    clock = FakeClock()
    progress = T.Progress(total_steps=10_000, max_minutes=cfg.max_minutes, clock=clock)
    assert T.get_lr(progress(0), cfg) == 0.0
    clock.now += 30
    assert T.get_lr(progress(3), cfg) == pytest.approx(formula(0.5, 1e-3, 1e-5, 0.05))
    clock.now += 30
    assert T.get_lr(progress(6), cfg) == pytest.approx(1e-5)


def test_progress_resumes_with_elapsed_time():
    clock = FakeClock()
    progress = T.Progress(total_steps=1000, max_minutes=1.0, elapsed=45.0, clock=clock)
    assert progress(0) == pytest.approx(0.75)
    assert progress.elapsed == pytest.approx(45.0)


# ---- EpochSampler ---------------------------------------------------------------------------


def test_sampler_order_fixed_by_seed_and_epoch():
    a, b = T.EpochSampler(50, seed=3), T.EpochSampler(50, seed=3)
    first = list(a)
    assert first == list(b)
    assert sorted(first) == list(range(50))
    a.set_epoch(1)
    second = list(a)
    # epoch 1's virtual indices are 50..99: the same images (i % 50), fresh augmentations
    assert sorted(second) == list(range(50, 100))
    assert [i % 50 for i in second] != first
    b.set_epoch(1)
    assert list(b) == second
    assert list(T.EpochSampler(50, seed=4)) != first


@pytest.mark.parametrize("start", [0, 1, 7, 49, 50])
def test_sampler_start_skips_exactly_k(start):
    sampler = T.EpochSampler(50, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=start)
    assert list(sampler) == full[start:]
    assert len(sampler) == 50 - start


class ModuloDataset(torch.utils.data.Dataset):
    """Like ImageDataset: a virtual index i + k*n names item i."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return (torch.tensor(index % self.n),)


def test_sampler_resume_gives_the_remaining_batches():
    data = ModuloDataset(40)
    sampler = T.EpochSampler(40, seed=0)
    sampler.set_epoch(3)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    full = [b[0].tolist() for b in loader]
    sampler.set_epoch(3, start=2 * 8)
    assert [b[0].tolist() for b in loader] == full[2:]


def test_repeated_augmentation():
    n, r = 12, 3
    sampler = T.EpochSampler(n, seed=5, repeats=r)
    order = list(sampler)
    assert len(order) == n == len(sampler)  # the epoch keeps its length
    assert len(set(order)) == n  # every virtual index is distinct ...
    real = [i % n for i in order]
    counts = Counter(real)
    assert len(counts) == n // r and set(counts.values()) == {r}  # ... each image r times
    for k in range(0, n, r):
        assert len(set(real[k : k + r])) == 1  # in a row
        assert sorted(i // n for i in order[k : k + r]) == list(range(r))  # i + n*copy
    sampler.set_epoch(1)
    assert [i % n for i in sampler] != real
    odd = T.EpochSampler(10, seed=5, repeats=3)
    assert len(list(odd)) == 10 == len(odd)


def test_repeated_indices_map_to_the_same_image():
    import preprocessing as P

    images = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(6)]
    ds = P.ImageDataset([f"m/{i}" for i in range(6)], list(range(6)), list("abcdef"), None, images)
    sampler = T.EpochSampler(6, seed=0, repeats=2)
    for virtual in sampler:
        image, label = ds[virtual]
        assert label == virtual % 6 and int(image[0, 0, 0]) == virtual % 6


@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (7, 2)])
def test_sampler_sharding_is_disjoint_and_covers_the_epoch(n, world):
    reference = T.EpochSampler(n, seed=9)
    reference.set_epoch(4)
    order = list(reference)
    parts = []
    for rank in range(world):
        sampler = T.EpochSampler(n, seed=9, rank=rank, world=world)
        sampler.set_epoch(4)
        part = list(sampler)
        assert len(part) == len(sampler) == n // world
        parts.append(part)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))  # disjoint
    assert set(flat) == set(order[: n - n % world])  # the whole (evenly divisible) epoch


def test_weighted_sampler_balances_classes():
    targets = torch.tensor([0] * 900 + [1] * 100)
    weights = T.class_weights(targets, 2)
    assert torch.allclose(weights, torch.tensor([1000 / 1800, 1000 / 200]))
    sampler = T.EpochSampler(1000, seed=0, weights=weights[targets])
    drawn = list(sampler)
    assert len(drawn) == 1000
    share = (targets[drawn] == 1).float().mean().item()
    assert 0.4 < share < 0.6  # 0.1 without balancing
    assert list(sampler) == drawn  # still fixed by (seed, epoch)


# ---- batch mixing, loss, EMA, optimizer groups ----------------------------------------------


def batch(b: int = 6, c: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4, 0][:b])


def test_no_mixer_when_both_off():
    assert T.make_batch_mixer(Config(mixup_alpha=0.0, cutmix_alpha=0.0), 5) is None


def test_mixup_soft_targets_and_images():
    torch.manual_seed(0)
    mixer = T.make_batch_mixer(Config(mixup_alpha=0.4), 5)
    x, y = batch()
    mx, my = mixer(x, y)
    assert my.shape == (6, 5) and mx.shape == x.shape
    assert torch.allclose(my.sum(1), torch.ones(6))
    lam = my[1, y[1]].item()  # y[1] != y[0], so this entry is lam alone
    onehot = F.one_hot(y, 5).float()
    assert torch.allclose(my, lam * onehot + (1 - lam) * onehot.roll(1, 0), atol=1e-6)
    assert torch.allclose(mx, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-5)


def test_cutmix_soft_targets_and_images():
    torch.manual_seed(1)
    mixer = T.make_batch_mixer(Config(cutmix_alpha=1.0), 5)
    x, y = batch()
    mx, my = mixer(x, y)
    assert my.shape == (6, 5)
    assert torch.allclose(my.sum(1), torch.ones(6))
    from_self = (mx == x).all(dim=1)  # (B, H, W): pixel kept
    from_other = (mx == x.roll(1, 0)).all(dim=1)  # pixel pasted from the previous image
    assert (from_self | from_other).all()
    kept = from_self[1].float().mean().item()  # y[1] != y[0]: its entry is the kept share
    assert 0 < kept < 1
    assert my[1, y[1]].item() == pytest.approx(kept, abs=1e-6)


def test_mixup_and_cutmix_together_pick_one():
    mixer = T.make_batch_mixer(Config(mixup_alpha=0.2, cutmix_alpha=1.0), 5)
    x, y = batch()
    _, my = mixer(x, y)
    assert my.shape == (6, 5) and torch.allclose(my.sum(1), torch.ones(6))


def test_soft_cross_entropy_hard_equals_one_hot():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1, 2])
    hard = T.soft_cross_entropy(logits, y, 0.1)
    soft = T.soft_cross_entropy(logits, F.one_hot(y, 3).float(), 0.1)
    assert torch.allclose(hard, soft)
    assert torch.allclose(hard, F.cross_entropy(logits, y, label_smoothing=0.1))


def smoke_model(**kw):
    torch.manual_seed(0)
    return build_model(Config.from_dict({**PRESETS["smoke"](), **kw}), num_classes=4)


def test_ema_follows_the_live_weights():
    assert T.make_ema(smoke_model(), 0.0) is None
    model = smoke_model()
    ema = T.make_ema(model, 0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model)
    live = dict(model.named_parameters())
    averaged = dict(ema.module.named_parameters())
    assert set(live) == set(averaged)
    assert any(not torch.equal(averaged[k], live[k]) for k in live)

    # With the live weights frozen, one update moves every weight 10% of the way to them.
    before = {k: v.detach().clone() for k, v in averaged.items()}
    ema.update_parameters(model)
    for k, p in live.items():
        expected = 0.9 * before[k] + 0.1 * p.detach()
        assert torch.allclose(averaged[k], expected, atol=1e-6), k
    gap_before = sum((before[k] - live[k]).norm().item() for k in live)
    gap_after = sum((averaged[k] - live[k]).norm().item() for k in live)
    assert gap_after == pytest.approx(0.9 * gap_before, rel=1e-4)


def decay_split(model, groups) -> tuple[set, set]:
    """The parameter names in groups with and without weight decay."""
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if not g["weight_decay"] for p in g["params"]}
    return decay, no_decay


def test_param_groups_skip_decay_on_biases_norms_and_tokens():
    model = smoke_model(teacher="t.pth")  # distilled: a dist_token too
    model.head_dist.weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups_layer_decay(model, 0.05, layer_decay=1.0)  # what train.py uses
    decay, no_decay = decay_split(model, groups)
    assert {g["weight_decay"] for g in groups} == {0.05, 0.0}
    assert {g["lr_scale"] for g in groups} == {1.0}  # layer_decay 1: one learning rate
    assert not decay & no_decay
    assert decay | no_decay == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"cls_token", "pos_embed", "dist_token", "norm.weight", "norm.bias"} <= no_decay
    assert all(
        n.endswith(".bias") or "norm" in n or "token" in n or n == "pos_embed" for n in no_decay
    )
    assert all(n.endswith(".weight") and "norm" not in n for n in decay)
    assert "blocks.0.attn.qkv.weight" in decay
    assert any(n.startswith("patch_embed.proj.") for n in decay)  # the (conv) tokenizer
    assert "blocks.0.norm1.weight" in no_decay and "blocks.1.mlp.fc2.bias" in no_decay
    assert "head_dist.weight" not in decay | no_decay


@pytest.mark.parametrize("arch", ["vit", "resnet18"])
def test_layer_decay_one_equals_plain_weight_decay_groups(arch):
    """param_groups_layer_decay(layer_decay=1) replaced training.param_groups: the same
    parameters get decay (weight matrices, not biases, norms, tokens or position
    embeddings), and every group the base learning rate."""
    model = smoke_model(arch=arch)
    skip = getattr(model, "no_weight_decay", lambda: set())()
    # the removed training.param_groups, as it was
    old_decay = {n for n, p in model.named_parameters() if p.ndim >= 2 and n not in skip}
    old_no_decay = {n for n, _ in model.named_parameters()} - old_decay
    groups = param_groups_layer_decay(model, 0.05, layer_decay=1.0)
    assert decay_split(model, groups) == (old_decay, old_no_decay)
    assert all(g["lr_scale"] == 1.0 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ---- SIGTERM --------------------------------------------------------------------------------


def test_stop_requested_flips_on_sigterm(sigterm_guard):
    stop = T.StopRequested()
    stop.install()
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stop.requested


# ---- train.py end to end --------------------------------------------------------------------


def read_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_smoke_run_then_test_script(tmp_path, sigterm_guard):
    model_path = train_smoke(tmp_path)
    assert model_path == tmp_path / "models" / "model.pth" and model_path.is_file()
    assert (tmp_path / "classes.txt").read_text().split() == [str(d) for d in range(10)]
    curves = tmp_path / "results" / "accuracy_loss.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "runs" / "smoke" / "config.json").read_text())["depth"] == 2

    ckpt = C.load_checkpoint(model_path)
    assert read_ckpt(model_path).keys() == ckpt.keys()
    assert ckpt["config"]["data"] == "digits" and ckpt["config"]["embed_dim"] == 32
    assert ckpt["classes"] == [str(d) for d in range(10)]
    assert ckpt["preprocessing"] == {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert {"val", "test"} <= set(ckpt["metrics"])
    assert 0.0 <= ckpt["metrics"]["val"]["accuracy"] <= 1.0
    assert ckpt["metrics"]["test"]["num_samples"] == 269
    assert {"created", "git_commit", "torch", "python"} <= set(ckpt["provenance"])

    out = tmp_path / "eval"
    assert test_script.main(["--model-path", str(model_path), "--results-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 269
    # test.py and the training run's own test evaluation agree (same split, same model).
    assert metrics["accuracy"] == pytest.approx(ckpt["metrics"]["test"]["accuracy"])


@pytest.mark.slow
def test_smoke_run_on_an_image_folder(tmp_path, sigterm_guard):
    data = make_class_folders(tmp_path / "images")
    model_path = train_smoke(tmp_path / "run", "--data", str(data))
    assert (tmp_path / "run" / "classes.txt").read_text().split() == ["cat", "dog", "owl"]
    ckpt = C.load_checkpoint(model_path)
    assert ckpt["classes"] == ["cat", "dog", "owl"]
    assert ckpt["config"]["data"] == str(data)
    assert ckpt["metrics"]["test"]["num_samples"] == 6
    out = tmp_path / "eval"
    assert test_script.main(["--model-path", str(model_path), "--results-dir", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 6


FAST = ("--limit-eval-batches", "1")


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def kill_at_step(monkeypatch, step: int) -> None:
    """SIGTERM this process while train_one_epoch computes the lr of `step` (0-based)."""
    calls = {"n": 0}
    real = T.get_lr

    def get_lr(progress, cfg):
        calls["n"] += 1
        if calls["n"] == step + 1:  # one call a step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(progress, cfg)

    monkeypatch.setattr(T, "get_lr", get_lr)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((), id="plain"),
        pytest.param(("--ema-decay", "0.9", "--mixup-alpha", "0.2"), id="ema-mixup"),
        pytest.param(
            ("--num-workers", "1"),
            id="workers",
        ),
    ],
)
def test_sigterm_mid_epoch_then_resume_is_exact(tmp_path, monkeypatch, sigterm_guard, extra):
    signal.signal(signal.SIGTERM, lambda *_: None)  # never kill pytest if train.py forgot
    straight = train_smoke(tmp_path / "straight", *FAST, *extra)

    kill_at_step(monkeypatch, 5)  # epoch 2 of 2, batch 2 of 4
    killed = train_smoke(tmp_path / "killed", *FAST, *extra)
    monkeypatch.undo()
    state = read_ckpt(C.resume_path(killed))
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 6)
    train_smoke(tmp_path / "killed", *FAST, *extra, "--resume", "true")

    a, b = read_ckpt(C.resume_path(straight)), read_ckpt(C.resume_path(killed))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 8)
    assert_same_state(a["model"], b["model"])
    if a["ema"] is not None:
        assert_same_state(a["ema"], b["ema"])
    final_a, final_b = read_ckpt(straight), read_ckpt(killed)
    assert final_a["metrics"]["epoch"] == final_b["metrics"]["epoch"]
    assert_same_state(final_a["state_dict"], final_b["state_dict"])


@pytest.mark.slow
def test_resume_with_more_epochs_continues_exactly(tmp_path, sigterm_guard):
    # A constant lr (min_lr = lr, no warmup) makes the schedule independent of --epochs, so
    # one epoch + a resumed second must equal two epochs in one go. (With the cosine schedule
    # the first run would decay over 1 epoch, a legitimate difference.)
    common = ("--lr", "1e-3", "--min-lr", "1e-3", "--warmup-fraction", "0", *FAST)
    common += ("--limit-train-batches", "4", "--seed", "3")
    straight = train_smoke(tmp_path / "straight", *common, "--epochs", "2")
    resumed = train_smoke(tmp_path / "resumed", *common, "--epochs", "1")
    assert read_ckpt(C.resume_path(resumed))["epoch"] == 1
    train_smoke(tmp_path / "resumed", *common, "--epochs", "2", "--resume", "true")
    a, b = read_ckpt(C.resume_path(straight)), read_ckpt(C.resume_path(resumed))
    assert b["epoch"] == 2 and b["step"] == a["step"] == 8
    assert_same_state(a["model"], b["model"])
    assert [row["val_accuracy"] for row in a["history"]] == [
        row["val_accuracy"] for row in b["history"]
    ]
    final_a, final_b = read_ckpt(straight), read_ckpt(resumed)
    assert final_a["metrics"]["epoch"] == final_b["metrics"]["epoch"]
    assert_same_state(final_a["state_dict"], final_b["state_dict"])


@pytest.mark.slow
def test_nan_loss_stops_with_exit_code_1(tmp_path, capsys, sigterm_guard):
    argv = [
        "--preset", "smoke", "--lr", "1e6",
        "--model-path", str(tmp_path / "m.pth"), "--results-dir", str(tmp_path / "r"),
        "--classes-path", str(tmp_path / "c.txt"), "--runs-dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: the loss became nan at step" in err
    assert "lower --lr" in err
    assert "Traceback" not in err
    assert not (tmp_path / "m.pth").exists()


@pytest.mark.slow
def test_train_main_restores_the_sigterm_handler(tmp_path, sigterm_guard):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    train_smoke(tmp_path, "--epochs", "1", "--limit-train-batches", "1", *FAST)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_torch_threads_are_capped_at_the_cores_the_process_may_use(monkeypatch):
    import runtime

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert runtime.default_threads() == 1
    assert runtime.set_torch_threads(2) == 1  # the digits preset's 2 on a one-core container
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert runtime.default_threads() == 4
    assert runtime.set_torch_threads(2) == 2
    assert runtime.set_torch_threads(0) == 2  # 0 leaves the setting as it is
    torch.set_num_threads(1)


# ---- the loop's pieces on their own: TrainState, train_step, Objective, devices -------------


def test_train_state_round_trip():
    from train_state import TrainState

    state = TrainState(run_name="r", step=7, epoch=1, batch=3, best_score=0.5)
    state.history.append({"epoch": 1, "val_accuracy": 0.5})
    again = TrainState.from_dict(state.to_dict())
    assert again == state
    assert TrainState.from_dict({**state.to_dict(), "model": {}}) == state  # extra keys ignored
    # a resume file written before ties went to the later epoch: (metric, -val_loss)
    assert TrainState.from_dict({**state.to_dict(), "best_score": [0.5, -1.2]}) == state


@pytest.mark.parametrize(
    "select_epoch, saved", [("best", [1, 2, 3, 3, 5, 5]), ("last", [1, 2, 3, 4, 5, 6])]
)
def test_best_saver_ties_go_to_the_later_epoch_and_only_a_gain_resets_patience(
    tmp_path, select_epoch, saved
):
    """Validation accuracy 0.5, 0.9, 0.9 (a tie with a lower loss), 0.8, 0.9 again (a tie
    with a higher loss, which the rule before chose against), 0.7: under --select-epoch best
    the model file holds epoch 5 at the end, under last epoch 6; the marks and --patience
    (every epoch since the last gain) are the same under both."""
    from metrics import EvalResult
    from train_state import TrainState

    values = {**PRESETS["smoke"](), "model_path": str(tmp_path / "model.pth")}
    cfg = Config(**values, select_epoch=select_epoch)
    model = build_model(cfg, num_classes=3)
    saver = train.BestSaver(cfg, ["a", "b", "c"], tmp_path / "run", main_process=True)
    state = TrainState(run_name="run")
    labels = np.array([0, 1, 2, 0])
    scores = [(0.5, 1.0), (0.9, 0.5), (0.9, 0.4), (0.8, 0.3), (0.9, 0.6), (0.7, 0.2)]
    marks, patience, in_file = [], [], []
    for epoch, (accuracy, loss) in enumerate(scores):
        state.epoch = epoch
        result = EvalResult(labels=labels, probs=np.full((4, 3), 1 / 3), loss=loss)
        marks.append(saver(state, model, "live", (result, {"accuracy": accuracy})))
        patience.append(state.bad_epochs)
        in_file.append(C.load_checkpoint(tmp_path / "model.pth")["metrics"]["epoch"])
    assert marks == ["*", "*", "=", "", "=", ""]
    assert patience == [0, 0, 1, 2, 3, 4]
    assert in_file == saved
    assert state.best_score == 0.9
    assert C.load_checkpoint(tmp_path / "run" / "model.pth")["metrics"]["epoch"] == saved[-1]


def test_best_saver_a_nan_score_is_never_the_best_and_other_ranks_write_nothing(tmp_path):
    """sklearn's Cohen's kappa is NaN when labels and predictions hold one class: that epoch
    is not saved and the next real score still is. A process other than rank 0 keeps the
    same score and patience and writes no file."""
    from metrics import EvalResult
    from train_state import TrainState

    values = {**PRESETS["smoke"](), "model_path": str(tmp_path / "model.pth")}
    cfg = Config(**values, select_metric="cohen_kappa")
    model = build_model(cfg, num_classes=3)
    result = EvalResult(labels=np.array([0, 1, 2]), probs=np.full((3, 3), 1 / 3), loss=1.0)
    for main_process in (False, True):
        saver = train.BestSaver(cfg, ["a", "b", "c"], tmp_path / "run", main_process)
        state, marks = TrainState(run_name="run"), []
        for epoch, kappa in enumerate([math.nan, 0.2]):
            state.epoch = epoch
            marks.append(saver(state, model, "live", (result, {"cohen_kappa": kappa})))
        assert marks == ["", "*"] and state.best_score == 0.2 and state.bad_epochs == 0
        assert (tmp_path / "model.pth").is_file() == main_process


def imbalanced_splits():
    import preprocessing as P

    images = [torch.full((3, 16, 16), 20 * i, dtype=torch.uint8) for i in range(12)]
    targets = [0] * 9 + [1] * 2 + [2]
    ds = P.ImageDataset([f"m/{i}" for i in range(12)], targets, ["a", "b", "c"], images=images)
    ds.transform = lambda image: image.float() / 255
    return P.Splits(ds, ds, ds, ["a", "b", "c"], [])


def make_test_loop(**overrides):
    cfg = Config.from_dict({**PRESETS["smoke"](), "num_workers": 0, **overrides})
    splits = imbalanced_splits()
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3)
    return train.make_loop(cfg, splits, model, None, torch.device("cpu"), 0, 1)


def grad_norm(model) -> float:
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)).item()


def test_gradient_clipping_clips_the_gradient_norm():
    x, y = (
        torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
        torch.arange(8) % 3,
    )
    free = make_test_loop(grad_clip=0.0, lr=1e-3)
    T.train_step(free, x, y, lr=1e-3)
    assert grad_norm(free.model) > 0.05  # the norm a clip of 0.01 must cut
    clipped = make_test_loop(grad_clip=0.01, lr=1e-3)
    loss, correct, n = T.train_step(clipped, x, y, lr=1e-3)
    assert math.isfinite(loss) and n == 8 and 0 <= correct <= 8
    assert grad_norm(clipped.model) == pytest.approx(0.01, rel=1e-3)


def test_balance_loss_weights_the_loss_by_inverse_class_frequency():
    x, y = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor(
        [0] * 9 + [1] * 2 + [2]
    )
    plain = make_test_loop(balance="none", label_smoothing=0.0)
    weighted = make_test_loop(balance="loss", label_smoothing=0.0)
    plain.model.eval(), weighted.model.eval()  # the same weights (seed 0), no drop path
    assert plain.objective.weight is None
    with torch.no_grad():
        loss_plain, logits = plain.objective(x, y)
        loss_weighted, _ = weighted.objective(x, y)
    weights = T.class_weights(y, 3)  # 12 / (3 * [9, 2, 1])
    assert torch.allclose(weighted.objective.weight, weights)
    assert torch.allclose(loss_plain, F.cross_entropy(logits, y))
    assert torch.allclose(loss_weighted, F.cross_entropy(logits, y, weight=weights))
    assert abs(loss_weighted.item() - loss_plain.item()) > 1e-3


def test_bf16_autocast_on_cpu_changes_the_forward_dtype():
    import runtime

    cpu = torch.device("cpu")
    model, x = smoke_model().eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad(), runtime.autocast_for(cpu, True)():  # CPU default: full precision
        assert model(x).dtype == torch.float32
    with torch.no_grad(), runtime.autocast_for(cpu, True, cpu=True)():
        assert model(x).dtype == torch.bfloat16
    with torch.no_grad(), runtime.autocast_for(cpu, False, cpu=True)():  # --amp false
        assert model(x).dtype == torch.float32
    loop = make_test_loop(label_smoothing=0.0)
    loop.autocast = runtime.autocast_for(cpu, True, cpu=True)
    loss, _, _ = T.train_step(loop, x.repeat(2, 1, 1, 1), torch.tensor([0, 1, 2, 0]), lr=1e-3)
    assert math.isfinite(loss)  # the loss is computed in float32 from bf16 logits


def test_device_selection_when_cuda_or_mps_are_reported_available(monkeypatch):
    import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.select_device("auto") == torch.device("cuda")
    assert runtime.select_device("cuda:1") == torch.device("cuda", 1)
    assert runtime.select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.select_device("auto") == torch.device("mps")
    with pytest.raises(runtime.DeviceError, match="CUDA is not available here"):
        runtime.select_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.select_device("auto") == torch.device("cpu")
    with pytest.raises(runtime.DeviceError, match="MPS is not available here"):
        runtime.select_device("mps")


@pytest.mark.slow
def test_compile_true_trains_a_step_on_cpu():
    import shutil

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python/platform")
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile's CPU backend (inductor) needs a C++ compiler; none found")
    # One block and the one-conv patch tokenizer: the same compiled training step with fewer
    # kernels for inductor to generate and g++ to build (most of this test's time).
    loop = make_test_loop(compile=True, drop_path_rate=0.0, depth=1, tokenizer="patch")
    assert hasattr(loop.objective.model, "_orig_mod")  # the model is trained compiled
    before = {k: v.clone() for k, v in loop.model.state_dict().items()}
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss, _, n = T.train_step(loop, x, y, lr=1e-3)
    assert math.isfinite(loss) and n == 4
    assert any(not torch.equal(before[k], v) for k, v in loop.model.state_dict().items())


# ---- train.py end to end: time budget, --resume auto, keeping models -------------------------


class FastClock(T.Progress):
    """Progress whose clock advances 10 s each time it is read: a 1-minute budget is spent
    within the first epoch's few steps, whatever the machine's speed."""

    def __init__(self, *args, **kwargs):
        ticks = iter(range(10**6))
        super().__init__(*args, clock=lambda: 10.0 * next(ticks), **kwargs)


@pytest.mark.slow
def test_max_minutes_stops_a_real_run(tmp_path, monkeypatch, sigterm_guard):
    monkeypatch.setattr(train, "Progress", FastClock)
    model = train_smoke(tmp_path, "--max-minutes", "1", "--epochs", "50", *FAST)
    state = read_ckpt(C.resume_path(model))
    assert state["epoch"] == 1 and len(state["history"]) == 1  # stopped in epoch 1 of 50
    assert 1 <= state["step"] < 4  # mid-epoch: the smoke preset's epoch has 4 steps
    assert C.load_checkpoint(model)["metrics"]["test"]["num_samples"] == 32  # and reported
    # the schedule fits the budget: the last step's lr is far down the cosine
    assert state["history"][0]["lr"] < 0.25 * PRESETS["smoke"]()["lr"]


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_resumes(tmp_path, capsys, sigterm_guard):
    common = ("--limit-train-batches", "2", *FAST, "--resume", "auto")
    model = train_smoke(tmp_path, *common, "--epochs", "1")
    assert "resumed" not in capsys.readouterr().out  # no resume file: a fresh start
    assert read_ckpt(C.resume_path(model))["epoch"] == 1
    train_smoke(tmp_path, *common, "--epochs", "2")
    assert "resumed" in capsys.readouterr().out
    state = read_ckpt(C.resume_path(model))
    assert (state["epoch"], state["step"]) == (2, 4)
    assert C.load_checkpoint(model)["config"]["resume"] == "auto"


def test_bare_resume_without_a_resume_file_is_a_clear_error(tmp_path, capsys, sigterm_guard):
    argv = [
        "--preset", "smoke", "--resume", "--model-path", str(tmp_path / "m.pth"),
        "--runs-dir", str(tmp_path / "runs"), "--classes-path", str(tmp_path / "c.txt"),
    ]  # fmt: skip
    assert train.main(argv) == 2  # `python source/train.py --resume`, as the docstring has it
    err = capsys.readouterr().err
    assert "--resume" in err and "no resume file" in err and "expected one argument" not in err


@pytest.mark.slow
def test_a_new_run_keeps_the_model_it_replaces(tmp_path, capsys, sigterm_guard):
    quick = ("--epochs", "1", "--limit-train-batches", "1", *FAST)
    model = train_smoke(tmp_path, *quick, "--run-name", "first")
    first = read_ckpt(model)
    assert first["run"]["name"] == "first"
    assert_same_state(read_ckpt(tmp_path / "runs" / "first" / "model.pth")["state_dict"],
                      first["state_dict"])  # fmt: skip
    capsys.readouterr()
    train_smoke(tmp_path, *quick, "--run-name", "second", "--seed", "5")
    out = capsys.readouterr().out
    kept = tmp_path / "runs" / "first" / "model.pth"
    line = next(x for x in out.splitlines() if x.startswith("this run replaces"))
    assert str(model) in line and "run first" in line and "test accuracy" in line
    assert f"that model stays in {kept}" in line
    assert_same_state(read_ckpt(kept)["state_dict"], first["state_dict"])
    assert read_ckpt(model)["run"]["name"] == "second"
    assert (tmp_path / "runs" / "second" / "model.pth").is_file()
    # the resume file holds exactly the TrainState plus the state dicts and the config
    from train_state import TrainState

    resume = read_ckpt(C.resume_path(model))
    assert set(resume) == set(TrainState("x").to_dict()) | {"model", "ema", "optimizer", "config"}


def test_a_model_from_before_run_folders_is_copied_with_its_classes_and_results(tmp_path):
    from train_state import keep_previous_model

    cfg = Config(model_path=str(tmp_path / "models" / "model.pth"), runs_dir=str(tmp_path / "runs"),
                 classes_path=str(tmp_path / "classes.txt"), results_dir=str(tmp_path / "results"))  # fmt: skip
    assert keep_previous_model(cfg, "new") is None  # nothing there yet
    old = C.make_checkpoint(smoke_model(), Config.from_dict(PRESETS["smoke"]()), list("abcd"),
                            {"val": {"accuracy": 0.75}})  # fmt: skip
    C.save_checkpoint(old, cfg.model_path)
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics.json").write_text('{"accuracy": 0.75}')
    line = keep_previous_model(cfg, "new")
    stamp = old["provenance"]["created"]
    folder = (
        tmp_path
        / "runs"
        / ("model-" + stamp[:10].replace("-", "") + "-" + stamp[11:19].replace(":", ""))
    )
    assert line == (f"this run replaces {cfg.model_path} (created {stamp}, val accuracy 0.7500); "
                    f"that model stays in {folder / 'model.pth'}")  # fmt: skip
    assert (folder / "model.pth").read_bytes() == Path(cfg.model_path).read_bytes()
    assert (folder / "classes.txt").read_text() == "a\nb\nc\nd\n"
    assert (folder / "results" / "metrics.json").is_file()


# ---- the budget-aware recipe (budget.py) ------------------------------------------------------


def test_budget_levels_follow_the_documented_thresholds():
    import budget as B

    assert [B.level_for(e) for e in (1, 24.9, 25, 99.9, 100, 500)] == [
        "light", "light", "medium", "medium", "heavy", "heavy"
    ]  # fmt: skip
    heavy = dict(augment="trivialaugment", random_erasing=0.25, mixup_alpha=0.8,
                 cutmix_alpha=1.0, label_smoothing=0.2)  # fmt: skip
    assert B.settings_for("light", heavy) == dict(
        augment="none", random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1
    )
    assert B.settings_for("medium", heavy) == dict(mixup_alpha=0.0, cutmix_alpha=0.0)
    assert B.settings_for("heavy", heavy) == {}
    # never more regularisation than configured; explicit keys keep the user's value
    plain = dict(heavy, augment="none", mixup_alpha=0.0, label_smoothing=0.0)
    assert B.settings_for("light", plain) == dict(random_erasing=0.0, cutmix_alpha=0.0)
    assert B.settings_for("light", heavy, explicit={"augment", "label_smoothing"}) == dict(
        random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0
    )


class RecordingTracker:
    def __init__(self):
        self.params, self.tags = {}, {}

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)


def fake_clock(monkeypatch, seconds_per_call: float) -> None:
    """budget.py reads its clock when training starts and when the first epoch ends: each
    read is `seconds_per_call` later, so the first epoch 'took' that long."""
    import itertools

    import budget as B

    ticks = itertools.count()
    monkeypatch.setattr(B, "clock", lambda: seconds_per_call * next(ticks))


HEAVY = dict(augment="trivialaugment", mixup_alpha=0.2, cutmix_alpha=0.0, label_smoothing=0.1)


@pytest.mark.parametrize(
    "seconds, level, augment, mixing",
    [(20.0, "light", "none", False), (1.0, "medium", "trivialaugment", False),
     (0.1, "heavy", "trivialaugment", True)],
)  # fmt: skip
def test_budget_recipe_chooses_by_the_epochs_that_fit(monkeypatch, seconds, level, augment, mixing):
    import budget as B
    from train_state import TrainState

    fake_clock(monkeypatch, seconds)  # a 1-minute budget: 3, 60 or 600 epochs fit
    loop = make_test_loop(**HEAVY, max_minutes=1.0, epochs=200)
    recipe = B.BudgetRecipe(loop.cfg, explicit=set())
    assert (recipe.start.augment, recipe.start.mixup_alpha) == ("none", 0.0)  # epoch 1: light
    state, tracker = TrainState("r"), RecordingTracker()
    assert recipe.begin(state, loop) is None
    state.epoch = 1
    line = recipe.after_epoch(state, loop, tracker)
    assert state.recipe["level"] == level and f"-> {level}" in line
    assert state.recipe["epochs_fit"] == pytest.approx(min(200, 60 / seconds))
    assert (loop.cfg.augment, loop.mixer is not None) == (augment, mixing)
    steps = [type(t).__name__ for t in loop.loader.dataset.transform.transforms]
    assert ("TrivialAugmentWide" in steps) == (augment == "trivialaugment")
    assert tracker.params["budget_recipe_level"] == tracker.tags["budget_recipe"] == level
    assert recipe.after_epoch(state, loop, tracker) is None  # decided once


def test_budget_recipe_is_off_without_a_budget_or_when_turned_off(monkeypatch):
    import budget as B
    from train_state import TrainState

    fake_clock(monkeypatch, 20.0)
    for off in (dict(max_minutes=0.0), dict(max_minutes=1.0, budget_recipe=False)):
        loop = make_test_loop(**HEAVY, **off)
        recipe = B.BudgetRecipe(loop.cfg, explicit=set())
        assert recipe.start == loop.cfg and recipe.describe_start() is None
        state = TrainState("r", epoch=1)
        assert recipe.begin(state, loop) is None
        assert recipe.after_epoch(state, loop, RecordingTracker()) is None
        assert state.recipe is None and loop.cfg.augment == "trivialaugment"


def test_train_state_keeps_the_budget_choice():
    from train_state import TrainState

    choice = {"level": "medium", "epochs_fit": 31.5, "seconds_per_epoch": 57.1,
              "settings": {"mixup_alpha": 0.0}}  # fmt: skip
    state = TrainState(run_name="r", epoch=1, recipe=choice)
    assert TrainState.from_dict(state.to_dict()).recipe == choice


def heavy_smoke(monkeypatch) -> None:
    """The smoke preset with regularisation the budget recipe can lighten (a preset's
    values, not the user's: the recipe may change them)."""
    smoke = PRESETS["smoke"]
    monkeypatch.setitem(PRESETS, "smoke", lambda: {**smoke(), **HEAVY, "label_smoothing": 0.2})


BUDGET = ("--max-minutes", "1", "--epochs", "200", *FAST)


@pytest.mark.slow
def test_budget_choice_survives_a_real_resume(tmp_path, monkeypatch, capsys, sigterm_guard):
    signal.signal(signal.SIGTERM, lambda *_: None)  # never kill pytest if train.py forgot
    heavy_smoke(monkeypatch)
    fake_clock(monkeypatch, 0.1)  # epoch 1 'takes' 0.1 s: 600 epochs fit, capped at 200
    kill_at_step(monkeypatch, 5)  # in epoch 2, after the choice
    model = train_smoke(tmp_path, *BUDGET)
    out = capsys.readouterr().out
    assert "first epoch trains light (augment none, mixup_alpha 0.0, label_smoothing 0.1)" in out
    assert "budget recipe: 200.0 epochs fit (0.1 s an epoch) -> heavy: nothing to change" in out
    choice = read_ckpt(C.resume_path(model))["recipe"]
    assert choice["level"] == "heavy" and choice["settings"] == {}
    assert read_ckpt(model)["budget_recipe"] == choice  # the best model records it too

    fake_clock(monkeypatch, 30.0)  # the resumed run would measure 2 epochs: light
    kill_at_step(monkeypatch, 1)
    train_smoke(tmp_path, *BUDGET, "--resume", "true")
    out = capsys.readouterr().out
    assert "budget recipe (resumed): 200.0 epochs fit (0.1 s an epoch) -> heavy" in out
    assert read_ckpt(C.resume_path(model))["recipe"] == choice


@pytest.mark.slow
def test_budget_light_choice_keeps_explicit_settings(tmp_path, monkeypatch, capsys, sigterm_guard):
    heavy_smoke(monkeypatch)
    fake_clock(monkeypatch, 30.0)  # 2 epochs fit a 1-minute budget
    model = train_smoke(tmp_path, *BUDGET[:2], "--epochs", "2", *FAST, "--augment",
                        "trivialaugment")  # fmt: skip
    out = capsys.readouterr().out
    assert "-> light: mixup_alpha 0.0, label_smoothing 0.1; kept as set: augment" in out
    choice = read_ckpt(C.resume_path(model))["recipe"]
    assert choice["settings"] == {"mixup_alpha": 0.0, "label_smoothing": 0.1}
    assert read_ckpt(model)["config"]["augment"] == "trivialaugment"  # as the user set it
