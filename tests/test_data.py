"""Data: deterministic stratified splits, the dataset layouts, broken files, decoding of every
image mode, transforms, the digits and torchvision sources, per-sample augmentation."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import augmentation as A
import preprocessing as P
import training as T
from config import Config
from conftest import make_image


def cfg_for(data, **kw) -> Config:
    return Config(data=str(data), image_size=16, patch_size=4, **kw)


def expected_take(n: int, fraction: float) -> int:
    return int(round(n * fraction))


def all_paths(splits: P.Splits) -> list[str]:
    return splits.train.paths + splits.val.paths + splits.test.paths


# ---- stratified_split -----------------------------------------------------------------------

TARGETS = [0] * 20 + [1] * 13 + [2] * 7 + [3] * 1


def test_stratified_split_is_deterministic_per_seed():
    a = P.stratified_split(TARGETS, [0.15, 0.2], seed=1)
    b = P.stratified_split(TARGETS, [0.15, 0.2], seed=1)
    c = P.stratified_split(TARGETS, [0.15, 0.2], seed=2)
    assert a == b
    assert a != c


def test_stratified_split_has_no_leakage_and_covers_everything():
    parts = P.stratified_split(TARGETS, [0.15, 0.2], seed=3)
    assert len(parts) == 3
    seen = [i for part in parts for i in part]
    assert len(seen) == len(set(seen))  # disjoint
    assert sorted(seen) == list(range(len(TARGETS)))  # union = all


def test_stratified_split_per_class_proportions():
    targets = np.array(TARGETS)
    train, val, test = P.stratified_split(targets, [0.15, 0.2], seed=4)
    for label, n in Counter(TARGETS).items():
        n_val = int((targets[val] == label).sum())
        n_test = int((targets[test] == label).sum())
        n_train = int((targets[train] == label).sum())
        if n >= 3:
            assert n_val == expected_take(n, 0.15), label
            assert n_test == expected_take(n, 0.2), label
        assert n_train >= 1, label  # every class keeps a training image
        assert n_train + n_val + n_test == n


def test_stratified_split_tiny_classes_stay_in_train():
    train, val, test = P.stratified_split([0, 1, 1], [0.5, 0.5], seed=0)
    assert 0 in train  # the only image of class 0
    assert len(train) >= 2 and sorted(train + val + test) == [0, 1, 2]


# ---- layouts --------------------------------------------------------------------------------


def test_class_folders_only(class_folders):
    splits = P.load_splits(cfg_for(class_folders))
    assert splits.classes == ["cat", "dog", "owl"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 6)
    for ds in (splits.train, splits.val, splits.test):
        for path, target in zip(ds.paths, ds.targets, strict=True):
            assert Path(path).parent.name == splits.classes[target]
    assert len(set(all_paths(splits))) == 36
    assert Counter(splits.val.targets) == {0: 2, 1: 2, 2: 2}
    assert splits.skipped == []
    # Cached as uint8 tensors (the default) and the same split on a second load.
    assert splits.train.images is not None and splits.train.images[0].dtype == torch.uint8
    assert P.load_splits(cfg_for(class_folders)).val.paths == splits.val.paths


@pytest.mark.parametrize("val_name", ["valid", "val", "validation", "Valid"])
def test_train_valid_test_folders(split_folders, val_name):
    if val_name != "valid":
        (split_folders / "valid").rename(split_folders / val_name)
    splits = P.load_splits(cfg_for(split_folders, cache_images=False))
    assert splits.classes == ["cat", "dog", "owl"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 9, 9)
    assert all(f"/{val_name}/" in p for p in splits.val.paths)
    assert all("/test/" in p for p in splits.test.paths)
    assert all("/train/" in p for p in splits.train.paths)
    for path, target in zip(splits.val.paths, splits.val.targets, strict=True):
        assert Path(path).parent.name == splits.classes[target]


def test_train_and_test_folders_carve_validation_from_train(split_folders):
    shutil.rmtree(split_folders / "valid")
    splits = P.load_splits(cfg_for(split_folders, val_fraction=0.2))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 9)
    assert all("/train/" in p for p in splits.val.paths)
    assert not set(splits.val.paths) & set(splits.train.paths)


def test_validation_folder_with_unknown_class(split_folders):
    make_image(split_folders / "valid" / "emu" / "0.png", 1)
    with pytest.raises(P.DataError, match="emu"):
        P.load_splits(cfg_for(split_folders))


def test_classes_are_sorted_folder_names(tmp_path):
    for i, name in enumerate(["zebra", "ant", "Mole"]):
        for j in range(4):
            make_image(tmp_path / name / f"{j}.png", i, seed=j)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "ant" / "notes.txt").write_text("not an image, ignored by extension")
    splits = P.load_splits(cfg_for(tmp_path, val_fraction=0.25, test_fraction=0.25))
    assert splits.classes == ["Mole", "ant", "zebra"]
    for ds in (splits.train, splits.val, splits.test):
        for path, target in zip(ds.paths, ds.targets, strict=True):
            assert Path(path).parent.name == splits.classes[target]
    assert splits.skipped == []


def write_manifest(folder: Path, rows: list[list[str]], name: str = "manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def manifest_images(folder: Path, per_class: int = 8) -> list[tuple[str, str]]:
    items = []
    for c, label in enumerate(["SSA", "HP"]):
        for i in range(per_class):
            rel = f"images/{label.lower()}_{i}.png"
            make_image(folder / rel, c, seed=100 * c + i)
            items.append((rel, label))
    return items


def test_csv_manifest_without_split_column(tmp_path, monkeypatch):
    folder = tmp_path / "mhist"
    items = manifest_images(folder, per_class=10)
    manifest = write_manifest(folder, [["Image Name", "Majority Vote Label"], *items])
    monkeypatch.chdir(tmp_path)  # paths are relative to the CSV's folder, not to the cwd
    splits = P.load_splits(cfg_for(manifest, val_fraction=0.2, test_fraction=0.2))
    assert splits.classes == ["HP", "SSA"]  # sorted label names
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 4, 4)
    for ds in (splits.train, splits.val, splits.test):
        for path, target in zip(ds.paths, ds.targets, strict=True):
            assert Path(path).is_file()
            assert Path(path).name.startswith(splits.classes[target].lower() + "_")


def test_csv_manifest_with_split_column(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    items = manifest_images(folder, per_class=8)
    names = ["train"] * 4 + ["valid", "validation"] + ["TEST", "test"]
    rows = [["path", "label", "split"]]
    rows += [[rel, label, names[i % 8]] for i, (rel, label) in enumerate(items)]
    manifest = write_manifest(folder, rows)
    monkeypatch.chdir(tmp_path)
    splits = P.load_splits(cfg_for(manifest))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 4)
    split_of = {Path(rel).name: names[i % 8].lower() for i, (rel, _) in enumerate(items)}
    for name, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        for path in ds.paths:
            assert split_of[Path(path).name] in P.SPLIT_DIRS[name]


def test_csv_paths_resolve_against_the_csv_folder_before_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    items = manifest_images(folder, per_class=6)
    manifest = write_manifest(folder, [["path", "label"], *items])
    elsewhere = tmp_path / "elsewhere"
    make_image(elsewhere / items[0][0], 2, seed=999)  # same relative path, other image
    monkeypatch.chdir(elsewhere)
    splits = P.load_splits(cfg_for(manifest, val_fraction=0.0, test_fraction=0.0))
    first = next(p for p in all_paths(splits) if Path(p).name == Path(items[0][0]).name)
    assert Path(first).resolve() == (folder / items[0][0]).resolve()


def test_csv_manifest_errors(tmp_path):
    folder = tmp_path / "d"
    items = manifest_images(folder, per_class=3)
    bad_cols = write_manifest(folder, [["file_name", "label"], *items], "cols.csv")
    with pytest.raises(P.DataError, match="no path column.*found: file_name, label"):
        P.load_splits(cfg_for(bad_cols))
    bad_split = write_manifest(
        folder, [["path", "label", "split"], *[[r, lab, "holdout"] for r, lab in items]], "s.csv"
    )
    with pytest.raises(P.DataError, match="'holdout' is not train, valid or test"):
        P.load_splits(cfg_for(bad_split))
    empty = write_manifest(folder, [["path", "label"]], "empty.csv")
    with pytest.raises(P.DataError, match="has no rows"):
        P.load_splits(cfg_for(empty))


# ---- broken files ---------------------------------------------------------------------------


def encode(fmt: str, size: int = 24, seed: int = 0, **kw) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    data = encode("JPEG", quality=95)
    scan = data.index(b"\xff\xda")  # start of scan: the headers stay intact
    return data[: scan + (len(data) - scan) // 2]


def test_broken_files_are_skipped_and_reported_once(class_folders, caplog):
    png = encode("PNG")
    broken = {
        class_folders / "cat" / "truncated.png": png[: len(png) // 2],
        class_folders / "dog" / "empty.png": b"",
        class_folders / "owl" / "notes.jpg": b"these are my notes, not a JPEG\n",
    }
    for path, data in broken.items():
        path.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        splits = P.load_splits(cfg_for(class_folders))
    assert len(splits.skipped) == 3
    for path in broken:
        assert sum(str(path) in reason for reason in splits.skipped) == 1
        assert str(path) not in all_paths(splits)
    assert any("empty" in r for r in splits.skipped if "empty.png" in r)
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.message
    ]
    assert len(warnings) == 1
    assert "3 unreadable" in warnings[0].message
    assert all(str(path) in warnings[0].message for path in broken)
    assert len(all_paths(splits)) == 36  # every good image still loads
    assert all(len(ds) for ds in (splits.train, splits.val, splits.test))


@pytest.mark.parametrize("cache", [True, False])
def test_truncated_jpeg_is_skipped_and_reported(class_folders, cache):
    bad = class_folders / "dog" / "truncated.jpg"
    bad.write_bytes(truncated_jpeg())
    splits = P.load_splits(cfg_for(class_folders, cache_images=cache))
    assert any(str(bad) in reason for reason in splits.skipped)
    assert str(bad) not in all_paths(splits)
    assert len(all_paths(splits)) == 36


def test_truncated_jpeg_fixture_really_is_broken(tmp_path):
    path = tmp_path / "t.jpg"
    path.write_bytes(truncated_jpeg())
    with pytest.raises(P.ImageError, match="t.jpg: unreadable image"):
        P.decode_image(path)


# ---- data errors ----------------------------------------------------------------------------


def test_folder_with_no_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(P.DataError, match="holds no readable images; check --data"):
        P.load_splits(cfg_for(tmp_path))


def test_empty_folder(tmp_path):
    with pytest.raises(P.DataError, match="has no class folders"):
        P.load_splits(cfg_for(tmp_path))


def test_class_without_images(class_folders):
    (class_folders / "emu").mkdir()
    with pytest.raises(P.DataError, match="class\\(es\\) emu have no readable training images"):
        P.load_splits(cfg_for(class_folders))


def test_class_whose_images_are_all_broken(class_folders):
    for path in (class_folders / "owl").iterdir():
        path.write_bytes(b"")
    with pytest.raises(P.DataError, match="owl have no readable training images"):
        P.load_splits(cfg_for(class_folders))


@pytest.mark.parametrize("spec", ["no/such/folder", "missing.csv", "imagenet"])
def test_bad_data_spec(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(P.DataError) as err:
        P.load_splits(cfg_for(spec))
    message = str(err.value)
    assert repr(spec) in message
    assert "digits" in message and "cifar10" in message and "check the path" in message


# ---- decoding -------------------------------------------------------------------------------


def roundtrip(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_decode_grayscale():
    out = P.decode_image(roundtrip(Image.new("L", (3, 2), 77), "PNG"))
    assert out.size == (3, 2)
    assert (pixels(out) == 77).all()


def test_decode_rgba_composites_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(200, 10, 10, 0), (200, 10, 10, 255), (10, 20, 30, 128)])
    out = pixels(P.decode_image(roundtrip(img, "PNG")))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> background
    assert out[0, 1].tolist() == [200, 10, 10]  # opaque -> itself
    half = [round(v * 128 / 255 + 255 * 127 / 255) for v in (10, 20, 30)]
    assert np.abs(out[0, 2] - half).max() <= 1


def test_decode_palette_with_transparency():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putdata([0, 1])
    data = roundtrip(img, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = pixels(P.decode_image(data))
    assert out[0, 0].tolist() == [255, 255, 255]  # the transparent index -> white, not black
    assert out[0, 1].tolist() == [255, 0, 0]


def test_decode_cmyk(tmp_path):
    img = Image.new("CMYK", (2, 1))
    img.putdata([(0, 255, 255, 0), (0, 0, 0, 255)])
    path = tmp_path / "cmyk.tif"
    img.save(path)
    out = pixels(P.decode_image(path))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [0, 0, 0]


def test_decode_16bit_png_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 4096, 32768, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    out = pixels(P.decode_image(path))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    expected = np.array([0, 4096, 32768, 65535]) / 65535 * 255
    assert np.abs(out[0, :, 0] - expected).max() <= 1
    assert out[0, 3, 0] == 255 and out[0, 0, 0] == 0


def test_decode_exif_rotated_jpeg():
    arr = np.zeros((10, 20, 3), dtype=np.uint8)  # H 10, W 20: left half red, right half blue
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    data = roundtrip(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    out = pixels(P.decode_image(data))
    assert out.shape == (20, 10, 3)  # portrait after rotation
    assert np.abs(out[2, 5] - [255, 0, 0]).max() < 40  # the left half is now on top
    assert np.abs(out[17, 5] - [0, 0, 255]).max() < 40


def test_decode_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(P.ImageError, match="empty.png: the file is empty"):
        P.decode_image(empty)
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    with pytest.raises(P.ImageError, match="text.jpg: not an image file"):
        P.decode_image(text)
    with pytest.raises(P.ImageError, match="empty"):
        P.decode_image(b"")


def test_decode_first_frame_of_animation():
    frames = [Image.new("RGB", (2, 2), c) for c in ((10, 200, 30), (250, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = pixels(P.decode_image(buf.getvalue()))
    assert np.abs(out[0, 0] - [10, 200, 30]).max() <= 8  # GIF palette quantisation


def _files_of_every_kind(folder: Path) -> dict[str, Path]:
    """Images decode_pixels sends to OpenCV (plain PNGs) and to PIL (everything else)."""
    rng = np.random.default_rng(0)
    rgb = np.kron(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), np.ones((5, 5, 1), np.uint8))
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]))
    palette = Image.fromarray(rgb).convert("P")
    exif = Image.Exif()
    exif[0x0112] = 6
    saves = {
        "rgb.png": (Image.fromarray(rgb), {}),
        "grey.png": (Image.fromarray(rgb[..., 0]), {}),
        "rgba.png": (rgba, {}),
        "palette.png": (palette, {}),
        "palette_transparent.png": (palette, {"transparency": 0}),
        "rgb.jpg": (Image.fromarray(rgb), {"quality": 90}),
        "rotated.jpg": (Image.fromarray(rgb), {"exif": exif.tobytes()}),
        "grey.jpg": (Image.fromarray(rgb[..., 1]), {}),
        "rgb.webp": (Image.fromarray(rgb), {}),
    }
    paths = {}
    for name, (image, params) in saves.items():
        paths[name] = folder / name
        image.save(paths[name], **params)
    paths["g16.png"] = folder / "g16.png"
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(paths["g16.png"])
    return paths


def test_decode_pixels_equals_pil_for_every_kind_and_uses_opencv_for_plain_png(
    tmp_path, monkeypatch
):
    import cv2

    opencv = []
    imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: opencv.append(1) or imdecode(*a))
    for name, path in _files_of_every_kind(tmp_path).items():
        opencv.clear()
        got = P.decode_pixels(str(path))
        expected = torch.from_numpy(pixels(P.decode_image(path)).astype(np.uint8))
        assert got.dtype == torch.uint8 and got.shape == (3, *expected.shape[:2]), name
        assert torch.equal(got, expected.permute(2, 0, 1)), name
        assert bool(opencv) == (name in ("rgb.png", "grey.png")), name


def test_decode_pixels_refuses_what_pil_refuses(tmp_path):
    """A PNG whose data is damaged fails its CRC in OpenCV too; PIL then names the error.
    A truncated PNG or one over the pixel budget never reaches OpenCV."""
    rgb = np.arange(48 * 40 * 3, dtype=np.uint8).reshape(40, 48, 3)
    good = io.BytesIO()
    Image.fromarray(rgb).save(good, "PNG")
    data = bytearray(good.getvalue())
    flipped = tmp_path / "flipped.png"
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[:-40])
    for path in (flipped, truncated):
        with pytest.raises(P.ImageError, match=path.name):
            P.decode_pixels(str(path))
    big = tmp_path / "big.png"
    big.write_bytes(good.getvalue())
    assert not P.plain_png(big.read_bytes(), max_pixels=48 * 40 - 1)
    missing = tmp_path / "missing.png"
    with pytest.raises(P.ImageError, match="missing.png: no such file"):
        P.decode_pixels(str(missing))


# ---- transforms -----------------------------------------------------------------------------

MEAN, STD = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
COLOUR = (51, 102, 204)


def normalised(colour=COLOUR, mean=MEAN, std=STD) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, mean, std, strict=True)])


@pytest.mark.parametrize("source", ["pil", "tensor"])
def test_eval_transform_shape_and_normalisation(source):
    img = Image.new("RGB", (40, 30), COLOUR)
    if source == "tensor":  # cached images are uint8 (3, H, W) tensors
        img = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    out = P.eval_transform(12, MEAN, STD)(img)
    assert out.shape == (3, 12, 12) and out.dtype == torch.float32
    assert torch.allclose(out, normalised()[:, None, None].expand(3, 12, 12), atol=1e-5)


def test_eval_transform_center_crops_the_short_side():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 10:30] = 255  # only the middle square is white
    out = P.eval_transform(10, (0, 0, 0), (1, 1, 1))(Image.fromarray(arr))
    assert out.shape == (3, 10, 10)
    assert out[:, :, 1:-1].min() > 0.95  # the center crop is the white square


@pytest.mark.parametrize("augment", ["none", "randaugment", "trivialaugment"])
def test_train_transform_shape_and_normalisation(augment):
    cfg = Config(image_size=16, mean=MEAN, std=STD, augment=augment, random_erasing=0.5)
    arr = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    out = P.train_transform(cfg)(Image.fromarray(arr))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    plain = Config(image_size=16, mean=MEAN, std=STD, augment="none", crop_scale=1.0)
    out = P.train_transform(plain)(Image.new("RGB", (24, 24), COLOUR))
    assert torch.allclose(out, normalised()[:, None, None].expand(3, 16, 16), atol=1e-5)
    if augment == "none":
        return
    # The policy alone (no crop, flip or erasing): it changes images, and the seed fixes how.
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    fixed = dict(image_size=16, crop_scale=1.0, hflip=False, random_erasing=0.0)
    policy = P.train_transform(Config(augment=augment, **fixed))
    reference = P.train_transform(Config(augment="none", **fixed))(image)

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return policy(image)

    outs = [draw(seed) for seed in range(8)]
    assert sum(not torch.equal(out, reference) for out in outs) >= 4  # identity is rare
    assert all(torch.equal(draw(seed), outs[seed]) for seed in range(8))  # same seed, same image
    assert len({out.numpy().tobytes() for out in outs}) >= 4  # seeds pick different ops


def test_with_transforms_uses_the_configs_mean_and_std(class_folders):
    cfg = cfg_for(class_folders, mean=MEAN, std=STD)
    splits = P.with_transforms(P.load_splits(cfg), cfg)
    image, label = splits.val[0]
    raw = P.eval_transform(16, (0, 0, 0), (1, 1, 1))(splits.val.load(0))
    assert image.shape == (3, 16, 16) and isinstance(label, int)
    expected = (raw - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(image, expected, atol=1e-5)
    assert splits.train[0][0].shape == (3, 16, 16)


# ---- digits and torchvision -----------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 8])
def test_digits_dataset(size):
    cfg = Config(data="digits", image_size=size)
    splits = P.load_splits(cfg)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert splits.classes == [str(d) for d in range(10)]
    assert len(splits.val) == sum(expected_take(n, cfg.val_fraction) for n in _digit_counts())
    assert splits.train.images[0].shape == (3, size, size)
    assert splits.train.images[0].dtype == torch.uint8
    assert not set(splits.train.paths) & set(splits.val.paths + splits.test.paths)
    P.with_transforms(splits, cfg)
    image, label = splits.test[0]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert 0 <= label < 10


def _digit_counts():
    from sklearn.datasets import load_digits

    return np.bincount(load_digits().target)


def fake_dataset(n_train: int, n_test: int, shape: tuple, as_tensor: bool = False):
    calls = []

    class Fake:
        classes = ["plane", "car", "bird", "cat"]

        def __init__(self, root, train=True, download=False, **kw):
            calls.append((root, train, download))
            n = n_train if train else n_test
            rng = np.random.default_rng(int(train))
            self.data = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
            self.targets = [i % 4 for i in range(n)]
            if as_tensor:  # MNIST keeps tensors
                self.data, self.targets = torch.from_numpy(self.data), torch.tensor(self.targets)

    return Fake, calls


def test_torchvision_dataset_from_local_files(monkeypatch, tmp_path):
    fake, calls = fake_dataset(40, 12, (32, 32, 3))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake)
    cfg = Config(data="cifar10", data_dir=str(tmp_path), val_fraction=0.25)
    splits = P.load_splits(cfg)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert splits.classes == fake.classes
    per_class_val = expected_take(10, 0.25)  # 10 images a class; round(2.5) == 2
    assert Counter(splits.val.targets) == {c: per_class_val for c in range(4)}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40 - 4 * per_class_val, 8, 12)
    reference = fake(str(tmp_path), train=False)
    assert torch.equal(splits.test.images[5], torch.from_numpy(reference.data[5]).permute(2, 0, 1))
    assert splits.test.targets == reference.targets
    P.with_transforms(splits, cfg)
    assert splits.train[0][0].shape == (3, 32, 32)


def test_torchvision_grayscale_dataset(monkeypatch, tmp_path):
    fake, _ = fake_dataset(20, 8, (28, 28), as_tensor=True)
    monkeypatch.setattr(torchvision.datasets, "MNIST", fake)
    splits = P.load_splits(Config(data="MNIST", data_dir=str(tmp_path)))
    image = splits.test.images[0]
    assert image.shape == (3, 28, 28)
    assert torch.equal(image[0], image[2])
    assert len(splits.train) + len(splits.val) == 20 and len(splits.test) == 8


def test_offline_download_failure_names_the_fix(monkeypatch, tmp_path):
    class Offline:
        def __init__(self, root, train=True, download=False, **kw):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    with pytest.raises(P.DataError) as err:
        P.load_splits(Config(data="cifar100", data_dir=str(tmp_path / "dl")))
    message = str(err.value)
    assert "could not download cifar100" in message
    assert f"copy the dataset files into {tmp_path / 'dl'}" in message
    assert "--data" in message


def torchvision_train_transform(cfg) -> torch.nn.Module:
    """What train_transform was before CropFlip and ToNormalizedFloat: torchvision v2 alone."""
    steps = [
        torchvision.transforms.v2.ToImage(),
        torchvision.transforms.v2.RandomResizedCrop(
            cfg.image_size, scale=(cfg.crop_scale, 1.0), antialias=True
        ),
    ]
    if cfg.hflip:
        steps.append(torchvision.transforms.v2.RandomHorizontalFlip())
    if cfg.augment == "trivialaugment":
        steps.append(torchvision.transforms.v2.TrivialAugmentWide())
    steps += [
        torchvision.transforms.v2.ToDtype(torch.float32, scale=True),
        torchvision.transforms.v2.Normalize(cfg.mean, cfg.std),
    ]
    if cfg.random_erasing:
        steps.append(torchvision.transforms.v2.RandomErasing(p=cfg.random_erasing, value=0))
    return torchvision.transforms.v2.Compose(steps)


@pytest.mark.parametrize(
    "shape, settings",
    [
        ((3, 32, 32), dict(image_size=32, crop_scale=0.8)),  # the cifar10 preset
        ((3, 8, 8), dict(image_size=16, hflip=False)),  # the digits preset: upsampled
        ((3, 40, 23), dict(image_size=24, crop_scale=0.08)),  # tall: v2's fallback crop too
        ((3, 9, 50), dict(image_size=8, crop_scale=0.3)),  # wide, downsampled
        ((3, 32, 32), dict(image_size=32, augment="trivialaugment", random_erasing=0.3)),
    ],
)
def test_train_transform_equals_torchvision_v2_bit_for_bit(shape, settings):
    # augmentation.CropFlip and ToNormalizedFloat replace v2's crop, flip and normalisation
    # for speed; every pixel and every random draw must stay v2's, so that a run's
    # augmentation (and the records in docs/benchmarks/learning.md) do not change.
    cfg = Config(mean=MEAN, std=STD, **settings)
    ours, reference = P.train_transform(cfg), torchvision_train_transform(cfg)
    rng = np.random.default_rng(0)
    for seed in range(150):
        image = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
        torch.manual_seed(seed)
        expected, drawn = reference(image), torch.get_rng_state()
        torch.manual_seed(seed)
        assert torch.equal(ours(image), expected), f"seed {seed}"
        assert torch.equal(torch.get_rng_state(), drawn), "not the same random draws"
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())  # PIL images work too
    torch.manual_seed(1)
    expected = reference(pil)
    torch.manual_seed(1)
    assert torch.equal(ours(pil), expected)


def test_crop_flip_falls_back_to_the_central_crop_like_torchvision():
    # Ten draws that never fit (a 3 x 60 strip) end in v2's central crop, clamped
    # to the aspect-ratio range: here the whole height and 4/3 of it in width, centred.
    crop = A.CropFlip(4, scale=(0.9, 1.0), hflip=False)
    assert crop.crop_box(3, 60) == (0, 28, 3, 4)
    v2_crop = torchvision.transforms.v2.RandomResizedCrop(4, scale=(0.9, 1.0))
    params = v2_crop.make_params([torch.zeros(3, 3, 60, dtype=torch.uint8)])
    assert params == dict(top=0, left=28, height=3, width=4)


# ---- per-sample augmentation ----------------------------------------------------------------


def test_augmentation_fixed_by_seed_epoch_and_index():
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 20, 20), dtype=np.uint8)) for _ in range(4)]
    cfg = Config(image_size=16, crop_scale=0.3, hflip=True, augment="trivialaugment")
    ds = P.ImageDataset([f"m/{i}" for i in range(4)], [0, 1, 0, 1], ["a", "b"], images=images)
    ds.transform = P.train_transform(cfg)
    ds.seed = 7
    first = ds[2][0]
    torch.manual_seed(12345)  # the global RNG state does not matter
    assert torch.equal(ds[2][0], first)
    assert not torch.equal(ds[2 + 4][0], first)  # a repeated (virtual) index: other augmentation
    assert ds[2 + 4][1] == ds[2][1]
    assert not torch.equal(ds[2 + 3 * 4][0], first)  # epoch 3's virtual index: fresh too
    assert torch.equal(ds[2][0], first)
    other = P.ImageDataset(ds.paths, ds.targets, ds.classes, ds.transform, images)
    other.seed = 8
    assert not torch.equal(other[2][0], first)


def test_augmentation_seeds_only_the_cpu_generator(monkeypatch):
    # torch.manual_seed also queues a seed for CUDA, XPU and MTIA and formats a stack trace
    # each time: per sample, a quarter of the digits training time. The draws must not change.
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 20, 20), dtype=np.uint8))
    transform = P.train_transform(Config(image_size=16, crop_scale=0.3, hflip=True))
    ds = P.ImageDataset(["m/0"], [0], ["a"], transform, [image])
    ds.seed = 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3 * 1_000_000_007 + 5)
        expected = transform(image)

    def refuse(seed):
        raise AssertionError("an accelerator was seeded for one training sample")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
    assert torch.equal(ds[5][0], expected)


def test_augmentation_changes_with_epoch_in_worker_processes():
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 20, 20), dtype=np.uint8)) for _ in range(8)]
    cfg = Config(image_size=16, crop_scale=0.3, hflip=True, num_workers=1, batch_size=4)
    ds = P.ImageDataset(
        [f"m/{i}" for i in range(8)], [0] * 8, ["a"], P.train_transform(cfg), images
    )
    ds.seed = 1
    sampler = T.EpochSampler(8, seed=1)
    loader = P.make_loader(ds, cfg, train=True, sampler=sampler)

    def one_epoch(epoch: int) -> torch.Tensor:
        sampler.set_epoch(epoch)  # what train.py does before each epoch
        return torch.cat([x for x, _ in loader])

    first, second = one_epoch(0), one_epoch(1)
    assert not torch.equal(first, second)


# ---- empty splits and loader workers (issue 25) --------------------------------------------


def test_csv_with_one_image_per_class_is_a_clear_error(tmp_path):
    folder = tmp_path / "one"
    items = manifest_images(folder, per_class=1)
    manifest = write_manifest(folder, [["path", "label"], *items])
    with pytest.raises(P.DataError) as err:
        P.load_splits(cfg_for(manifest))
    message = str(err.value)
    assert message.startswith(f"{manifest}: the val split has no images; give classes 4+ images")
    assert "--val-fraction" in message and "split column" in message


def test_given_split_without_images_is_a_clear_error(split_folders):
    for image in (split_folders / "test").rglob("*.png"):
        image.unlink()
    with pytest.raises(P.DataError, match="the test split has no images; add images to it"):
        P.load_splits(cfg_for(split_folders))


def test_a_zero_fraction_gives_an_empty_split_that_training_refuses(class_folders, capsys):
    import train

    splits = P.load_splits(cfg_for(class_folders, test_fraction=0.0))
    assert len(splits.test) == 0 and len(splits.val) > 0
    argv = ["--preset", "smoke", "--data", str(class_folders), "--test-fraction", "0",
            "--model-path", str(class_folders.parent / "m.pth")]  # fmt: skip
    assert train.main(argv) == 2
    assert "error: the test split has no images, and training needs one" in capsys.readouterr().err


def test_loader_workers_are_capped_at_the_usable_cores(monkeypatch, caplog):
    import runtime

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    P.loader_workers.cache_clear()
    with caplog.at_level(logging.WARNING, logger="preprocessing"):
        assert P.loader_workers(8) == 2  # the birds preset's 8 on 2 cores
        assert P.loader_workers(8) == 2
        assert P.loader_workers(1) == 1 and P.loader_workers(0) == 0
    notices = [r.getMessage() for r in caplog.records if "num_workers" in r.getMessage()]
    assert notices == ["num_workers 8 lowered to 2, the cores this process may use"]  # once
    loader = P.make_loader(ModuloImages(), Config(num_workers=8, batch_size=2), train=False)
    assert loader.num_workers == 2
    P.loader_workers.cache_clear()


class ModuloImages(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return torch.zeros(3, 2, 2), 0


def test_data_for_a_model_must_have_its_classes_in_order():
    cfg = Config(data="digits", image_size=16, patch_size=4)
    classes = [str(c) for c in P.load_splits(cfg).classes]
    assert [str(c) for c in P.load_splits_for_model(cfg, classes).classes] == classes
    swapped = [classes[1], classes[0], *classes[2:]]
    with pytest.raises(P.DataError, match=r"the classes of digits \(10\) differ from the model's"):
        P.load_splits_for_model(cfg, swapped)
    with pytest.raises(P.DataError, match=r"\(10\) differ from the model's \(2\)"):
        P.load_splits_for_model(cfg, ["cat", "dog"])
