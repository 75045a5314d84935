"""checkpoint.py: round trip, weights_only safety, refusal messages, atomic writes."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint as C
from config import PRESETS, Config
from transformer import build_model

CLASSES = ["cat", "dog", "owl"]


def smoke_cfg(**kw) -> Config:
    return Config.from_dict({**PRESETS["smoke"](), **kw})


def trained_like(cfg: Config, num_classes: int = 3, seed: int = 0):
    """A model with non-default values in every tensor (as after training)."""
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def saved(tmp_path: Path, cfg=None, classes=CLASSES, name="model.pth", **extra) -> Path:
    cfg = cfg or smoke_cfg()
    model = trained_like(cfg, len(classes))
    metrics = {"val": {"accuracy": 0.75}, "test": {"accuracy": 0.5}}
    path = tmp_path / name
    C.save_checkpoint(C.make_checkpoint(model, cfg, classes, metrics, **extra), path)
    return path


# ---- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pool": "mean", "qkv_bias": False},
        {"pool": "seq", "tokenizer": "conv", "pos_embed": "sincos"},
        {"teacher": "teacher.pth"},  # distilled: a second token and head
        {"image_size": 24, "patch_size": 8, "mean": (0.1, 0.2, 0.3), "std": (0.3, 0.2, 0.1)},
    ],
    ids=["default", "mean", "seq-conv-sincos", "distilled", "24px"],
)
def test_round_trip_gives_identical_logits(tmp_path, overrides):
    cfg = smoke_cfg(**overrides)
    model = trained_like(cfg)
    metrics = {"val": {"accuracy": 0.75}, "test": {"accuracy": 0.5}}
    path = tmp_path / "models" / "model.pth"
    C.save_checkpoint(C.make_checkpoint(model, cfg, CLASSES, metrics, threshold=None), path)
    loaded, ckpt = C.load_model(path)
    assert not loaded.training
    x = images(size=cfg.image_size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert C.config_from_checkpoint(ckpt) == cfg
    assert ckpt["classes"] == CLASSES
    assert ckpt["preprocessing"] == {
        "image_size": cfg.image_size,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
    }
    assert ckpt["metrics"] == metrics
    assert ckpt["format"] == C.FORMAT and ckpt["format_version"] == C.FORMAT_VERSION
    assert {"created", "git_commit", "torch", "torchvision", "python"} <= set(ckpt["provenance"])


def test_saved_dict_loads_with_weights_only(tmp_path):
    path = saved(tmp_path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(C.REQUIRED_KEYS) <= set(raw)
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())
    assert zipfile.is_zipfile(path)  # torch's current format


def test_checkpoint_tensors_are_detached_copies(tmp_path):
    cfg = smoke_cfg()
    model = trained_like(cfg)
    ckpt = C.make_checkpoint(model, cfg, CLASSES)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # training goes on after the snapshot
    assert not torch.equal(ckpt["state_dict"]["head.bias"], model.head.bias)
    assert not ckpt["state_dict"]["head.bias"].requires_grad


def test_config_with_unknown_keys_still_loads(tmp_path):
    """A checkpoint from a newer version (one more config field) still rebuilds."""
    path = saved(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["some_future_field"] = 3
    torch.save(ckpt, path)
    model, _ = C.load_model(path)
    assert model.head.out_features == 3


# ---- refusals -------------------------------------------------------------------------------


class Payload:
    """Pickles as a call to open(marker, "w"): loading it with pickle creates the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = torch.load(saved(tmp_path), weights_only=True)
    ckpt["provenance"]["note"] = Payload(marker)
    evil = tmp_path / "evil.pth"
    torch.save(ckpt, evil)
    assert not marker.exists()
    with pytest.raises(C.CheckpointError) as err:
        C.load_checkpoint(evil)
    assert not marker.exists()
    message = str(err.value)
    assert f"refused to load {evil}" in message and "pickled Python objects" in message
    with pytest.raises(C.CheckpointError):
        C.load_model(evil)
    with pytest.raises(C.CheckpointError):
        C.load_resume(evil)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_bare_state_dict_is_refused(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(trained_like(smoke_cfg()).state_dict(), path)
    with pytest.raises(C.CheckpointError) as err:
        C.load_model(path)
    assert "is not a checkpoint of this project" in str(err.value)
    assert "bare state_dict" in str(err.value) and "--pretrained" in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "none" / "model.pth"
    with pytest.raises(C.CheckpointError) as err:
        C.load_model(path)
    assert f"no model file at {path}" in str(err.value)
    assert "make all" in str(err.value)
    with pytest.raises(C.CheckpointError, match="no resume file at"):
        C.load_resume(tmp_path / "x.resume.pth")


def test_truncated_file(tmp_path):
    path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(C.CheckpointError) as err:
        C.load_model(path)
    assert f"{path} is not a readable PyTorch checkpoint" in str(err.value)
    assert "truncated" in str(err.value)


NOT_TORCH_FILES = [
    pytest.param(b"PK\x03\x04 not really a zip", id="broken-zip"),
    pytest.param(
        b"not a checkpoint, just text\n",
        id="text",
    ),
    pytest.param(
        b"\x89PNG\r\n\x1a\n" + bytes(64),
        id="png",
    ),
    pytest.param(
        b"hello world\n",
        id="text-keyerror",
    ),
]


@pytest.mark.parametrize("data", NOT_TORCH_FILES)
def test_other_file_types_are_refused_clearly(tmp_path, data):
    path = tmp_path / "model.pth"
    path.write_bytes(data)
    with pytest.raises(C.CheckpointError) as err:
        C.load_checkpoint(path)
    assert f"{path} is not a readable PyTorch checkpoint" in str(err.value)


def test_non_dict_and_incomplete_checkpoints(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(C.CheckpointError, match="holds a list, not a checkpoint dict"):
        C.load_checkpoint(path)
    ckpt = torch.load(saved(tmp_path), weights_only=True)
    del ckpt["classes"]
    torch.save(ckpt, path)
    with pytest.raises(C.CheckpointError, match="lacks classes; it is incomplete"):
        C.load_checkpoint(path)
    ckpt = torch.load(saved(tmp_path), weights_only=True)
    ckpt["format_version"] = C.FORMAT_VERSION + 1
    torch.save(ckpt, path)
    with pytest.raises(C.CheckpointError, match="newer than this code"):
        C.load_checkpoint(path)


def test_other_class_count_names_the_mismatching_tensors(tmp_path):
    path = saved(tmp_path)  # 3 classes
    ckpt = C.load_checkpoint(path)
    model = build_model(smoke_cfg(), num_classes=5)
    with pytest.raises(C.CheckpointError) as err:
        C.load_state_dict_checked(model, ckpt["state_dict"], source=str(path))
    message = str(err.value)
    assert "head.weight (3, 32) vs model (5, 32)" in message
    assert "head.bias (3,) vs model (5,)" in message
    assert "class count" in message
    # The same through load_model when the class list does not fit the weights.
    ckpt["classes"] = ["a", "b", "c", "d", "e"]
    torch.save(ckpt, path)
    with pytest.raises(C.CheckpointError, match=r"head\.weight \(3, 32\) vs model \(5, 32\)"):
        C.load_model(path)


def test_other_architecture_names_missing_and_unexpected(tmp_path):
    ckpt = C.load_checkpoint(saved(tmp_path))
    model = build_model(smoke_cfg(depth=3), num_classes=3)
    with pytest.raises(C.CheckpointError) as err:
        C.load_state_dict_checked(model, ckpt["state_dict"])
    assert "missing: blocks.2." in str(err.value)
    model = build_model(smoke_cfg(depth=1, pool="seq"), num_classes=3)
    with pytest.raises(C.CheckpointError) as err:
        C.load_state_dict_checked(model, ckpt["state_dict"])
    assert "missing: attn_pool.bias, attn_pool.weight" in str(err.value)
    assert "unexpected: blocks.1." in str(err.value)
    assert "pos_embed (1, 17, 32) vs model (1, 16, 32)" in str(err.value)


def test_a_checkpoint_is_written_only_when_it_loads_back(tmp_path):
    """A value weights_only=True cannot read (a numpy scalar) is refused before anything is
    written, naming where it is; the same checkpoint with plain values loads back equal."""
    cfg = smoke_cfg()
    model = trained_like(cfg)
    path = tmp_path / "model.pth"
    numpy_metrics = {"val": {"accuracy": np.float64(1)}}
    with pytest.raises(TypeError, match=r"\['metrics'\]\['val'\]\['accuracy'\] is a numpy.float64"):
        C.save_checkpoint(C.make_checkpoint(model, cfg, CLASSES, numpy_metrics), path)
    assert list(tmp_path.iterdir()) == []
    C.save_checkpoint(C.make_checkpoint(model, cfg, CLASSES, {"val": {"accuracy": 1.0}}), path)
    loaded_model, loaded = C.load_model(path)
    assert loaded["metrics"] == {"val": {"accuracy": 1.0}}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded_model.state_dict()[name], tensor), name


# ---- atomic writes --------------------------------------------------------------------------


def test_atomic_save_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "model.pth"
    C.atomic_save({"a": torch.arange(3)}, target)
    C.atomic_save({"a": torch.arange(4)}, target)  # overwrite
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pth"]
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.arange(4))


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch, error):
    target = tmp_path / "model.pth"
    C.atomic_save({"a": torch.arange(3)}, target)
    before = target.read_bytes()
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half written, then the crash
        raise error

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(type(error)):
        C.atomic_save({"a": torch.arange(1000)}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]
    assert torch.equal(C._load(target, "model")["a"], torch.arange(3))


def test_resume_path_is_beside_the_model():
    assert C.resume_path("metadata/models/model.pth") == Path("metadata/models/model.resume.pth")
    assert C.resume_path("/x/best.pt").name == "best.resume.pth"


def test_next_save_removes_stale_temporaries_of_a_killed_write(tmp_path):
    """A SIGKILL mid-write leaves `.model.pth.<random>.tmp`: the next save of model.pth
    removes it once it is over a minute old; a fresh one (another writer, still busy) and
    other files stay."""
    import os
    import time

    stale, fresh = tmp_path / ".model.pth.k1ll3d_0.tmp", tmp_path / ".model.pth.bu5y_w0r.tmp"
    other = [tmp_path / ".onnx.onnx.0ld0ld00.tmp", tmp_path / "notes.tmp", tmp_path / ".x.tmp"]
    for path in (stale, fresh, *other):
        path.write_bytes(b"half a checkpoint")
    long_ago = time.time() - 3600
    for path in (stale, *other):
        os.utime(path, (long_ago, long_ago))
    C.atomic_save({"a": torch.arange(3)}, tmp_path / "model.pth")
    assert not stale.exists() and fresh.exists() and all(p.exists() for p in other)
    assert torch.equal(torch.load(tmp_path / "model.pth", weights_only=True)["a"], torch.arange(3))


def test_clean_stale_temporaries_takes_every_target_in_the_folder(tmp_path):
    import os
    import time

    from fileio import clean_stale_temporaries

    old = [tmp_path / ".model.pth.aaaaaaaa.tmp", tmp_path / ".model.onnx.b_c1d2e3.tmp"]
    keep = [tmp_path / ".model.pth.ffffffff.tmp", tmp_path / "model.pth", tmp_path / ".y.tmp"]
    for path in (*old, *keep):
        path.write_bytes(b"x")
    for path in (*old, keep[1], keep[2]):
        os.utime(path, (time.time() - 120, time.time() - 120))
    assert sorted(clean_stale_temporaries(tmp_path)) == sorted(old)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in old)
    assert clean_stale_temporaries(tmp_path / "missing") == []
