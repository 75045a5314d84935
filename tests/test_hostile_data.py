"""Hostile input on the data side (issue 26): configs, CSV manifests, folder scans, the training
image cache, monitor.py's scan. Each problem is refused in one line naming it, or the file is
skipped and listed once with its reason. The corpus is tests/hostile.py's.

Memory is measured once, in one child process (its own peak RSS), for every huge image.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import hostile
import pytest

import config as C
import preprocessing as P
from conftest import make_class_folders

ROOT = Path(__file__).resolve().parents[1]
MAX_GROWTH_MB = 300  # beyond the child's baseline, for any one hostile image


def smoke(**overrides) -> C.Config:
    return C.Config.from_dict({**C.PRESETS["smoke"](), **overrides})


def one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text, text
    return text


# ---- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,words",
    [
        ("depth_200000", "depth 200000 is over the limit of 64"),
        ("image_size_100000", "image_size 100000 is over the limit of 4096"),
        ("seed_negative", "seed -1 is out of range; use 0 to 4294967295"),
    ],
)
def test_bad_config_values_are_one_config_error(name, words):
    with pytest.raises(C.ConfigError) as info:
        C.validate(smoke(**hostile.bad_configs()[name]))
    assert words in one_line(info.value)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(embed_dim=8192, num_heads=64, depth=64), "parameters (over 2); lower depth"),
        (dict(image_size=4096, patch_size=4), "gives 1,048,576 patches (over 65,536)"),
        (dict(embed_dim=9000, num_heads=9), "embed_dim 9000 is over the limit of 8192"),
        (dict(num_heads=256, embed_dim=256), "num_heads 256 is over the limit of 128"),
        (dict(mlp_ratio=0.0), "mlp_ratio must be above 0"),
        (dict(tokenizer="conv", patch_size=6, image_size=24), "power-of-two patch_size"),
    ],
)
def test_model_shape_is_bounded(overrides, words):
    with pytest.raises(C.ConfigError) as info:
        C.validate(smoke(**overrides))
    assert words in one_line(info.value)


def test_the_largest_named_model_and_the_limits_themselves_pass():
    C.validate(smoke(model_size="base", image_size=224, patch_size=16))
    for cfg in (smoke(seed=0), smoke(seed=2**32 - 1), smoke(image_size=4096, patch_size=16)):
        assert C.validate(cfg) is cfg


def test_model_path_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(C.ConfigError) as info:
        C.parse_config(["--preset", "smoke", "--model-path", str(tmp_path)])
    assert one_line(info.value) == (
        f"--model-path {tmp_path} is a folder; give a file path such as {tmp_path / 'model.pth'}"
    )


def test_num_workers_1000_is_capped_at_the_usable_cores():
    P.loader_workers.cache_clear()
    cfg = C.validate(smoke(**hostile.bad_configs()["num_workers_1000"]))
    loader = P.make_loader(P.load_splits(cfg).val, cfg, train=False)
    assert 0 < loader.num_workers <= len(os.sched_getaffinity(0))
    P.loader_workers.cache_clear()


@pytest.mark.parametrize("name", ["val_fraction_0", "test_fraction_0"])
def test_a_zero_fraction_is_refused_before_training(name):
    import train

    cfg = C.validate(smoke(**hostile.bad_configs()[name]))
    with pytest.raises(P.DataError) as info:
        train.needs_val_and_test(P.load_splits(cfg))
    split = name.split("_")[0]
    assert one_line(info.value).startswith(f"the {split} split has no images, and training")


# ---- CSV manifests --------------------------------------------------------------------------


@pytest.fixture
def manifests(tmp_path):
    return hostile.bad_manifests(tmp_path)


@pytest.mark.parametrize(
    "name,words",
    [
        ("row_without_label", "line 14: no label (columns path, label)"),
        ("empty_label", "line 14: no label"),
        ("latin1_bytes", "is not UTF-8 text (byte 0xe9 on line 13); save it as UTF-8 (in Excel"),
        ("duplicate_conflicting", "lines 2 and 14 list"),
        ("one_image_per_class", "the val split has no images; give classes 4+ images"),
        ("one_class", "the data has 1 class (cat); a classifier needs at least 2"),
    ],
)
def test_csv_manifest_problem_is_one_data_error_naming_the_file(manifests, name, words):
    path, _ = manifests[name]
    with pytest.raises(P.DataError) as info:
        P.load_csv_splits(path, smoke(data=str(path)))
    message = one_line(info.value)
    assert message.startswith(str(path)) and words in message


def test_csv_conflict_names_both_labels(manifests):
    path, _ = manifests["duplicate_conflicting"]
    with pytest.raises(P.DataError, match=r"as 'dog' \(train\) and 'cat' \(train\); keep one row"):
        P.load_csv_splits(path, smoke(data=str(path)))


def test_csv_with_a_byte_order_mark_is_read_as_excel_writes_it(manifests):
    path, _ = manifests["utf8_bom_header"]
    splits = P.load_csv_splits(path, smoke(data=str(path), val_fraction=0.2, test_fraction=0.2))
    assert splits.classes == ["cat", "dog"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12


def test_csv_repeated_row_is_reported_once_and_kept_once(manifests, caplog):
    path, _ = manifests["utf8_bom_header"]
    path.write_bytes(path.read_bytes() + b"img01.png,cat\nimg03.png,cat\n")
    with caplog.at_level(logging.WARNING, logger="preprocessing"):
        splits = P.load_csv_splits(path, smoke(data=str(path), val_fraction=0.2, test_fraction=0.2))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12
    notes = [r.getMessage() for r in caplog.records if "duplicate" in r.getMessage()]
    assert notes == [f"{path}: 2 duplicate row(s) ignored (lines 14, 15): the same file and "
                     "label as an earlier row"]  # fmt: skip


def test_csv_same_file_in_train_and_test_is_refused(tmp_path):
    make_class_folders(tmp_path, per_class=4)
    rows = [f"{c}/{i:03d}.png,{c},train" for c in ("cat", "dog", "owl") for i in range(4)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\ncat/000.png,cat,test\n")
    with pytest.raises(P.DataError, match=r"lines 2 and 14 list .*\(train\) and 'cat' \(test\)"):
        P.load_splits(smoke(data=str(manifest)))


# ---- decoding: every decoder failure is the file's one line ---------------------------------


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return hostile.broken_images(tmp_path_factory.mktemp("broken"))


UNSUPPORTED = {"svg", "pdf", "heic", "dds_unknown_fourcc", "blp1_unknown_encoding"}


def test_decode_image_turns_every_decoder_error_into_one_image_error(broken):
    reasons = {}
    for name, (path, _) in broken.items():
        with pytest.raises(P.ImageError) as info:
            P.decode_image(path)
        reasons[name] = one_line(info.value)
        assert reasons[name].startswith(f"{path}: ")
    for name in UNSUPPORTED:
        assert "unsupported format" in reasons[name], reasons[name]
    assert reasons["svg"].endswith("unsupported format (SVG); convert it to PNG or JPEG")
    assert reasons["symlink_loop"].endswith("a symbolic link loop")
    assert reasons["dangling_symlink"].endswith("no such file (a dangling symbolic link?)")
    assert reasons["zero_byte"].endswith("the file is empty (0 bytes)")


@pytest.mark.parametrize("cache", [True, False])
def test_scan_lists_every_broken_file_once_and_keeps_the_good_ones(broken, tmp_path, cache):
    root = make_class_folders(tmp_path / "data", per_class=8)
    for path, _ in broken.values():
        target = root / "cat" / path.name
        if path.is_symlink():
            target.symlink_to(os.readlink(path))
        elif path.is_dir():
            target.mkdir()
        else:
            shutil.copy(path, target)
    splits = P.load_splits(smoke(data=str(root), cache_images=cache))
    assert len(splits.train) + len(splits.val) + len(splits.test) == 24
    listed = {line.split(": ")[0]: line for line in splits.skipped}
    assert len(listed) == len(splits.skipped)  # once each
    scanned = (*P.IMAGE_EXTENSIONS, *P.UNSUPPORTED)  # .dds, .blp, .spi files are not images
    expected = {
        str(root / "cat" / path.name)
        for name, (path, _) in broken.items()
        if path.suffix in scanned and name != "directory_named_jpg"
    }
    assert set(listed) == expected
    for name in ("heic", "pdf", "svg"):
        assert "unsupported format" in listed[str(root / "cat" / broken[name][0].name)]


def test_cache_counts_every_image_not_the_first(tmp_path, monkeypatch):
    """The first images are tiny, the last is large: the cache stops when the total passes
    its limit (the old check judged from the first image only and cached all of them)."""
    root = make_class_folders(tmp_path / "data", per_class=8)  # 20 x 20 images
    from conftest import make_image

    make_image(root / "owl" / "big.png", 2, size=300)
    small = 24 * 20 * 20 * 3
    monkeypatch.setattr(P, "CACHE_LIMIT_BYTES", small + 100 * 100 * 3)
    splits = P.load_splits(smoke(data=str(root), val_fraction=0.25, test_fraction=0.25))
    assert splits.train.images is None and splits.test.images is None
    monkeypatch.setattr(P, "CACHE_LIMIT_BYTES", small + 300 * 300 * 3)
    splits = P.load_splits(smoke(data=str(root), val_fraction=0.25, test_fraction=0.25))
    assert splits.train.images is not None


def test_monitor_scan_lists_broken_files(broken, tmp_path):
    import monitor

    folder = tmp_path / "new"
    make_class_folders(folder, per_class=2)
    for path, _ in broken.values():
        if path.is_file() and not path.is_symlink():
            shutil.copy(path, folder / "cat" / path.name)
    (folder / "dog" / "loop.jpg").symlink_to("loop.jpg")
    dataset, skipped = monitor.load_new_data(str(folder), smoke(), ["cat"], labelled=False)
    assert len(dataset) == 6
    scanned = (*P.IMAGE_EXTENSIONS, *P.UNSUPPORTED)
    files = sum(1 for p, _ in broken.values() if p.is_file() and p.suffix in scanned)
    assert len(skipped) == files + 1 and all("\n" not in s for s in skipped)
    assert any(s.endswith("loop.jpg: a symbolic link loop") for s in skipped)


def test_pixel_budget_is_configurable(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "50000")
    with pytest.raises(P.ImageError) as info:
        P.decode_image(path)
    assert "300 x 200 = 60,000 over the limit of 50,000; set MAX_IMAGE_PIXELS" in one_line(
        info.value
    )
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "60000")
    assert P.decode_image(path).size == (300, 200)


# ---- memory: one child process for every huge input -----------------------------------------

MEMORY_CHILD = """
import json, resource, sys, tempfile, warnings
from pathlib import Path
warnings.simplefilter("ignore")
import torch, hostile, preprocessing as P

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

folder = Path(sys.argv[1])
huge = hostile.huge_images(folder / "huge")
before, out = peak_mb(), {}
for name, (path, _) in huge.items():
    for scale in (1, 8):
        try:
            P.decode_image(path, scale=scale)
            result = "ok"
        except P.ImageError as err:
            result = "ImageError"
        out[f"{name}/{scale}"] = [result, round(peak_mb() - before)]
good, bad, images = P.scan_images([(str(p), 0) for p, _ in huge.values()], decode=True)
out["scan"] = [len(good), len(bad), round(peak_mb() - before)]
print(json.dumps(out))
"""


def test_huge_images_cost_bounded_memory(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'source'}:{ROOT / 'tests'}"}
    env.pop("MAX_IMAGE_PIXELS", None)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_CHILD), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(out)
    scan = out.pop("scan")
    assert all(growth < MAX_GROWTH_MB for _, growth in out.values()), out
    assert scan[2] < MAX_GROWTH_MB, scan
    refused = {k for k, (result, _) in out.items() if result == "ImageError"}
    assert "png_1bit_13000/1" in refused and "webp_lossless_12000/8" in refused
    assert out["jpeg_12000/1"][0] == "ImageError"  # 144 megapixels decoded in full: refused
    assert scan[0] + scan[1] == len([k for k in out if k.endswith("/1")])
