"""Hostile inputs (issue 26): the generators of tests/hostile.py produce what they claim, then
what the project does with them on the serving and model side.

imagesafe.open_image and Predictor.predict on every huge and broken image, memory included (one
child process runs every case and reports its peak RSS after each, from resource.getrusage:
Pillow allocates its pixels with malloc, which tracemalloc does not see); checkpoint.load_model
on every malformed checkpoint (one CheckpointError line each, before any model is built) and on
a deflate bomb. The data side (configs, CSV manifests, folder scans, preprocessing.decode_image)
is tests/test_hostile_data.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import hostile
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MAX_GROWTH_MB = 300  # beyond the process's baseline, for any one hostile input
CHILD_MEMORY_LIMIT = 6 * 1024**3  # address space of a child that may try to build a huge model


# ---- shared fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    return hostile.huge_images(tmp_path_factory.mktemp("huge"))


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return hostile.broken_images(tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    """A smoke-preset checkpoint written by the project's own make_checkpoint (untrained
    weights: building it takes milliseconds, training would take seconds)."""
    from checkpoint import make_checkpoint
    from config import PRESETS, Config
    from transformer import build_model

    cfg = Config.from_dict(PRESETS["smoke"]())
    torch.manual_seed(0)
    return make_checkpoint(build_model(cfg, 10), cfg, [str(i) for i in range(10)])


@pytest.fixture(scope="module")
def checkpoint_path(checkpoint, tmp_path_factory) -> Path:
    from checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "model.pth"
    save_checkpoint(checkpoint, path)
    return path


HUGE_NAMES = [
    "jpeg_12000",
    "png_1bit_13000",
    "png_strip_tall",
    "png_strip_wide",
    "webp_lossless_12000",
    "bmp_rle8_12000",
    "tiff_g4_13000",
    "ico_png_13000",
    "gif_12000",
    "ppm_12000",
    "pbm_plain_12000",
    "tga_rle_12000",
    "qoi_12000",
    "pcx_12000",
    "sgi_12000",
    "dds_12000",
    "j2k_12000",
]
BROKEN_NAMES = [
    "truncated_jpeg",
    "truncated_png",
    "truncated_gif",
    "truncated_tiff",
    "truncated_bmp",
    "spider",
    "dds_unknown_fourcc",
    "blp1_unknown_encoding",
    "avif_corrupt",
    "random_bytes",
    "svg",
    "svg_named_png",
    "pdf",
    "heic",
    "zero_byte",
    "symlink_loop",
    "dangling_symlink",
    "directory_named_jpg",
]


# ---- the generators produce what they claim ---------------------------------------------------


def test_corpus_names_are_complete(huge, broken):
    """The parametrised lists below cover every generated case (j2k and avif need their
    codec: they are listed, and skipped where Pillow lacks it)."""
    assert set(huge) <= set(HUGE_NAMES) and set(HUGE_NAMES) - set(huge) <= {"j2k_12000"}
    assert set(broken) <= set(BROKEN_NAMES) and set(BROKEN_NAMES) - set(broken) <= {"avif_corrupt"}


@pytest.mark.parametrize("name", HUGE_NAMES)
def test_huge_image_declares_its_size(huge, name):
    """The header alone says the declared size (no decode), under PIL's refusal limit, and
    the file is tiny."""
    if name not in huge:
        pytest.skip(f"{name}: codec not in this Pillow")
    path, pixels = huge[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bomb warning; the icon's "not the expected size"
        with Image.open(path) as img:
            width, height = img.size
    assert width * height == pixels
    assert pixels >= 1_000_000
    assert pixels < 2 * Image.MAX_IMAGE_PIXELS  # PIL itself would not refuse it
    assert path.stat().st_size <= 21_000


def test_strips_are_one_pixel_thin(huge):
    with Image.open(huge["png_strip_tall"][0]) as img:
        assert img.size == (1, hostile.STRIP)
    with Image.open(huge["png_strip_wide"][0]) as img:
        assert img.size == (hostile.STRIP, 1)


@pytest.mark.parametrize("name", BROKEN_NAMES)
def test_broken_image_raises_its_exception(broken, name):
    if name not in broken:
        pytest.skip(f"{name}: codec not in this Pillow")
    path, error = broken[name]
    with pytest.raises(error) as info:
        hostile.open_and_load(path)
    # The exact type where it matters: the point of these cases is each distinct type.
    if error in (EOFError, RuntimeError):
        assert type(info.value) is error
    assert not isinstance(info.value, (OSError, ValueError, SyntaxError)) or error in (
        OSError,
        FileNotFoundError,
        IsADirectoryError,
        Image.UnidentifiedImageError,
    )


def test_links_are_links(broken):
    assert broken["symlink_loop"][0].is_symlink() and broken["dangling_symlink"][0].is_symlink()
    assert not broken["dangling_symlink"][0].exists()


def test_bad_checkpoints_load_with_weights_only(checkpoint, tmp_path):
    cases = hostile.bad_checkpoints(checkpoint)
    assert set(hostile.HUGE_CHECKPOINTS) <= set(cases) and len(cases) >= 40
    for name, ckpt in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(ckpt, path)
        loaded = torch.load(path, weights_only=True)
        assert set(loaded) == set(ckpt), name
    assert checkpoint["format_version"] == 1 and checkpoint["config"]["depth"] == 2  # untouched
    assert cases["depth_200000"]["config"]["depth"] == 200_000
    assert _dict_differs(cases["nan_weights"]["state_dict"], checkpoint["state_dict"])


def _dict_differs(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(_dict_differs(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape != b.shape or not torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    return type(a) is not type(b) or a != b


def test_every_bad_checkpoint_differs_from_the_original(checkpoint):
    same = [
        n
        for n, c in hostile.bad_checkpoints(checkpoint).items()
        if not _dict_differs(c, checkpoint)
    ]
    assert same == []


def test_deflate_bomb_checkpoint_is_small_on_disk(checkpoint, tmp_path):
    path = hostile.deflate_bomb_checkpoint(checkpoint, tmp_path / "bomb.pth", mebibytes=64)
    with zipfile.ZipFile(path) as archive:
        inflated = sum(info.file_size for info in archive.infolist())
    assert inflated > 200 * path.stat().st_size  # what a loader can check before inflating
    assert inflated >= 64 * 1024**2


def test_bad_manifests_hold_their_problem(tmp_path):
    manifests = hostile.bad_manifests(tmp_path)
    data = {name: path.read_bytes() for name, (path, _) in manifests.items()}
    with pytest.raises(UnicodeDecodeError):
        data["latin1_bytes"].decode("utf-8")
    assert data["utf8_bom_header"].startswith(b"\xef\xbb\xbfpath,label\n")
    assert data["row_without_label"].endswith(b"img00.png\n")
    assert data["empty_label"].endswith(b"img00.png,\n")
    assert data["duplicate_conflicting"].endswith(b"img00.png,cat\nimg00.png,dog\n")
    assert data["one_image_per_class"].count(b"\n") == 3
    assert {line.split(b",")[1] for line in data["one_class"].splitlines()[1:]} == {b"cat"}
    assert len(list((tmp_path / "images").glob("*.png"))) == 12


def test_bad_configs_pass_the_type_check():
    """Each value has the right type: only a range check can refuse it."""
    from config import PRESETS, Config

    for name, overrides in hostile.bad_configs().items():
        cfg = Config.from_dict({**PRESETS["smoke"](), **overrides})
        for key, value in overrides.items():
            assert getattr(cfg, key) == value, name


# ---- what the project does with them -----------------------------------------------------


def run_child(code: str, limit_bytes: int | None = None, timeout: float = 120) -> dict:
    """Run `code` in a fresh interpreter (source/ and tests/ importable); it must end by
    printing one JSON object. `growth_mb(baseline)` there is the peak RSS above baseline."""
    prelude = textwrap.dedent("""
        import json, resource, sys, warnings
        warnings.simplefilter("ignore")
        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        """)

    def limit():
        if limit_bytes:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'source'}:{ROOT / 'tests'}",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        preexec_fn=limit,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"crash": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(lines[-1])


MEMORY_CHILD = """
import torch  # the baseline includes the libraries every entry point loads
from imagesafe import ImageError, open_image
from predict import Predictor
predictor = Predictor({model!r}, device="cpu")
predictor.predict({warm!r})  # first-call allocations belong to the baseline
before = peak_mb()
out = {{}}
for name, path in {cases!r}.items():
    case = out[name] = {{}}
    for key, size in (("decode", None), ("decode_fit", predictor.image_size)):
        try:
            image = open_image(path, size=size)
            case[key] = "ok %dx%d" % image.size
            del image
        except ImageError as err:
            case[key] = "ImageError: " + str(err)
        except BaseException as err:
            case[key] = "raised " + type(err).__name__ + ": " + str(err)[:120]
    try:
        results = predictor.predict(path)  # a folder is expanded: to nothing here
        case["predict"] = results[0].error or ("ok " + str(results[0].predicted)) if results else ""
    except BaseException as err:
        case["predict"] = "raised " + type(err).__name__ + ": " + str(err)[:120]
    case["peak_mb"] = peak_mb() - before
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def memory(huge, broken, checkpoint_path, tmp_path_factory) -> dict:
    """{case: {decode, decode_fit, predict, peak_mb}}, every huge and broken image through
    open_image (full size and fitted to the model) and Predictor.predict in ONE child: its
    peak RSS only grows, so each case's peak_mb bounds what it, and every case before it,
    took above the baseline."""
    warm = tmp_path_factory.mktemp("warm") / "warm.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(warm)
    cases = {n: str(p) for n, (p, _) in {**huge, **broken}.items()}
    code = MEMORY_CHILD.format(model=str(checkpoint_path), warm=str(warm), cases=cases)
    out = run_child(code, limit_bytes=CHILD_MEMORY_LIMIT)
    assert "crash" not in out, out
    return out


@pytest.mark.parametrize("name", HUGE_NAMES)
def test_huge_image_costs_bounded_memory(huge, memory, name):
    """open_image and Predictor.predict each refuse or shrink the image within budget."""
    if name not in huge:
        pytest.skip(f"{name}: codec not in this Pillow")
    out = memory[name]
    print(name, out)
    assert not any(str(v).startswith("raised") for v in out.values()), out
    assert out["peak_mb"] < MAX_GROWTH_MB, out
    if name != "jpeg_12000":  # 144 megapixels or a 1:1,000,000 strip: refused from the header
        assert out["decode_fit"].startswith("ImageError") and "refused" in out["predict"], out
    else:  # decoded at 1/8 scale, then shrunk: a prediction
        assert out["predict"].startswith("ok"), out
        assert out["decode"].startswith("ImageError"), out  # no size given: 144 MP refused


@pytest.mark.parametrize("name", BROKEN_NAMES)
def test_broken_image_costs_bounded_memory_and_is_one_error(broken, memory, name):
    if name not in broken:
        pytest.skip(f"{name}: codec not in this Pillow")
    out = memory[name]
    assert out["decode"].startswith("ImageError") and out["decode_fit"] == out["decode"], out
    if name == "directory_named_jpg":  # a folder given as input: its (no) image files
        assert out["predict"] == "", out
    else:
        assert not out["predict"].startswith(("ok", "raised")) and "\n" not in out["predict"], out
    assert out["peak_mb"] < MAX_GROWTH_MB, out


def test_predictor_keeps_good_files_beside_broken_ones(broken, checkpoint_path, tmp_path):
    from predict import Predictor

    good = [tmp_path / "a.png", tmp_path / "b.jpg"]
    Image.new("RGB", (20, 20), (200, 10, 10)).save(good[0])
    Image.new("RGB", (30, 20), (10, 200, 10)).save(good[1])
    # A folder given as input is expanded to its (no) files, by design: not a bad file.
    bad = [path for name, (path, _) in broken.items() if name != "directory_named_jpg"]
    predictor = Predictor(checkpoint_path, device="cpu")
    results = predictor.predict([good[0], *bad, good[1]])
    assert [r.source for r in results] == [str(p) for p in [good[0], *bad, good[1]]]
    assert results[0].ok and results[-1].ok
    failed = {r.source: r.error for r in results[1:-1]}
    assert all(error and "\n" not in error for error in failed.values()), failed
    # Unsupported formats are named as such, not "unreadable".
    for name in ("svg", "pdf", "heic", "dds_unknown_fourcc", "blp1_unknown_encoding"):
        if name in broken:
            assert "unsupported" in failed[str(broken[name][0])].lower(), (name, failed)


@pytest.mark.parametrize("name", sorted(set(BROKEN_NAMES) - {"avif_corrupt"}) + ["avif_corrupt"])
def test_open_image_turns_every_decoder_error_into_image_error(broken, name):
    import imagesafe

    if name not in broken:
        pytest.skip(f"{name}: codec not in this Pillow")
    path = broken[name][0]
    for size in (None, 16):
        with pytest.raises(imagesafe.ImageError) as info:
            imagesafe.open_image(path, size=size)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
    with pytest.raises(imagesafe.ImageError):
        imagesafe.open_image(path.read_bytes() if path.is_file() else b"", name="upload.png")


def test_open_image_budget_is_configurable(huge, monkeypatch):
    import imagesafe

    path = huge["png_1bit_13000"][0]
    with pytest.raises(imagesafe.ImageError, match="over the limit of 40,000,000; set MAX_IMAGE"):
        imagesafe.open_image(path)
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "1000")
    small = hostile.png_bytes(40, 30)  # 1,200 pixels
    with pytest.raises(imagesafe.ImageError, match="40 x 30 = 1,200 over the limit of 1,000"):
        imagesafe.open_image(small)
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS='lots' is not a number"):
        imagesafe.open_image(small)
    monkeypatch.delenv("MAX_IMAGE_PIXELS")
    assert imagesafe.open_image(small).size == (40, 30)
    assert imagesafe.pixel_limit(2000) == 64 * 2000**2  # a huge model input raises the default


LOAD_CHILD = """
from checkpoint import CheckpointError, load_model
before, out = peak_mb(), {{}}
for name, path in {cases!r}.items():
    try:
        model, ckpt = load_model(path)
        case = {{"result": "loaded"}}
    except CheckpointError as err:
        case = {{"result": "CheckpointError", "message": str(err)}}
    except BaseException as err:
        case = {{"result": type(err).__name__, "message": str(err)[:200]}}
    case["peak_mb"] = peak_mb() - before  # this case's and every earlier one's
    out[name] = case
print(json.dumps(out))
"""


def _bad_checkpoint_names() -> list[str]:
    # The names without building a checkpoint at collection time: a tiny stand-in works.
    stub = {
        "format": "vit-pipeline",
        "format_version": 1,
        "state_dict": {"w": torch.zeros(2, 2), "head.weight": torch.zeros(2, 2)},
        "config": {"depth": 2},
        "classes": ["a", "b"],
        "preprocessing": {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    return list(hostile.bad_checkpoints(stub))


@pytest.fixture(scope="module")
def bad_checkpoints(checkpoint, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_checkpoints")
    paths = {}
    for name, ckpt in hostile.bad_checkpoints(checkpoint).items():
        paths[name] = folder / f"{name}.pth"
        torch.save(ckpt, paths[name])
    return paths


@pytest.fixture(scope="module")
def loaded_in_child(bad_checkpoints, checkpoint, tmp_path_factory) -> dict:
    """{name: {result, message, peak_mb}} for the checkpoints that would allocate tens of GB
    if the checks failed (the huge ones and a deflate bomb of 512 MiB): ONE child process
    under an address-space limit loads them in turn and reports its peak RSS after each."""
    bomb = tmp_path_factory.mktemp("bomb") / "bomb.pth"
    hostile.deflate_bomb_checkpoint(checkpoint, bomb, mebibytes=512)
    cases = {name: str(bad_checkpoints[name]) for name in hostile.HUGE_CHECKPOINTS}
    out = run_child(LOAD_CHILD.format(cases={**cases, "deflate_bomb": str(bomb)}),
                    limit_bytes=CHILD_MEMORY_LIMIT)  # fmt: skip
    assert "crash" not in out, out
    return out


@pytest.mark.parametrize("name", _bad_checkpoint_names())
def test_load_model_refuses_bad_checkpoint(bad_checkpoints, loaded_in_child, name):
    from checkpoint import CheckpointError, load_model

    path = bad_checkpoints[name]
    if name in hostile.HUGE_CHECKPOINTS:
        out = loaded_in_child[name]
    else:
        try:
            load_model(path)
            out = {"result": "loaded"}
        except CheckpointError as err:
            out = {"result": "CheckpointError", "message": str(err)}
        except Exception as err:  # noqa: BLE001 - recorded, then asserted against
            out = {"result": type(err).__name__, "message": str(err)[:200]}
    print(name, out)
    assert out["result"] == "CheckpointError", out
    assert "\n" not in out["message"] and str(path) in out["message"], out
    assert out.get("peak_mb", 0) < MAX_GROWTH_MB, out


def test_load_model_refuses_deflate_bomb(loaded_in_child):
    out = loaded_in_child["deflate_bomb"]
    print(out)
    assert out["result"] == "CheckpointError", out
    assert "refused before loading" in out["message"], out
    assert out["peak_mb"] < MAX_GROWTH_MB, out
