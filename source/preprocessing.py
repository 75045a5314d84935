"""Datasets, deterministic splits, transforms and data loaders.

`--data` picks the source:
    digits                 scikit-learn's 1,797 8x8 handwritten digits (embedded, offline)
    path/to/folder         ImageFolder: train/ valid|val|validation/ test/ subfolders with one
                           folder per class (Kaggle birds), or class folders only (split here)
    path/to/manifest.csv   a path column, a label column, an optional split column
    cifar10, cifar100, mnist, fashionmnist   torchvision downloads into --data-dir

Splits missing from the source are carved out of the training data, stratified by class and
fixed by the seed, so no image is ever in two splits.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from augmentation import train_transform
from imagesafe import IMAGE_EXTENSIONS, ImageError, open_image, plain_png
from manifest import SPLIT_NAMES, ManifestError, read_manifest
from runtime import default_threads

log = logging.getLogger("preprocessing")

SPLIT_DIRS = SPLIT_NAMES  # train | val | test -> the folder (and CSV split) names for it
TORCHVISION_DATASETS = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "mnist": "MNIST",
    "fashionmnist": "FashionMNIST",
}
CACHE_LIMIT_BYTES = 2 * 1024**3  # decoded uint8 images cached in memory up to this size
# Formats Pillow does not read: listed as skipped (named), never silently left out.
UNSUPPORTED = {".svg": "SVG", ".pdf": "PDF", ".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF"}


class DataError(ValueError):
    """A user-fixable data problem; the message names it and the fix."""


# ---- decoding: imagesafe's, the one decoder (budget, failures as one line) ----------------


def decode_image(source, scale: int = 1) -> Image.Image:
    """A path, bytes or PIL image -> an RGB PIL image at full resolution, or ImageError naming
    the problem in one line (imagesafe.open_image: the pixel budget, $MAX_IMAGE_PIXELS, is
    checked on the header before any pixel is decoded). scale > 1 is a quick readability check
    (the folder scan's): JPEGs decode at libjpeg's smallest scale and nothing large is kept."""
    return open_image(source, size=1 if scale > 1 else None)


def decode_pixels(path: str) -> torch.Tensor:
    """A file -> (3, H, W) uint8 RGB tensor, or ImageError: what decode_image gives, faster.

    Plain 8-bit .png files (imagesafe.plain_png) are decoded by OpenCV, which gives the same pixels
    in about half of PIL's time at 32 px (benchmarks/decode.py); a corrupt PNG fails its
    CRC in both. Every other file, JPEG included, goes through PIL: OpenCV decodes a JPEG
    with corrupt entropy data into grey blocks without an error, where PIL refuses it (the
    benchmark counts them), and a corrupt image must be skipped and reported, not learnt.
    """
    data = None
    if str(path).lower().endswith(".png"):
        # On OSError open_image names the problem (missing file, a folder, a link loop).
        with contextlib.suppress(OSError):
            data = Path(path).read_bytes()
    if data is not None and plain_png(data):
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is not None:
            return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
    image = open_image(path) if data is None else open_image(data, name=str(path))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # pil_to_tensor, half the cost


# ---- datasets ------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """(image, label) pairs from files or from an in-memory uint8 array.

    `paths` name every sample (file paths, or `digits/<index>` for in-memory data) for
    reports. Unreadable files found at load time are skipped and listed in `skipped`.
    """

    def __init__(self, paths, targets, classes, transform=None, images=None):
        self.paths = list(paths)
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform
        self.images = images  # list of (C, H, W) uint8 tensors, or None: decode lazily
        self.seed: int | None = None  # set for training: augmentation fixed by (seed, index)

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int):
        """The untransformed image: a (3, H, W) uint8 tensor, cached or decoded now."""
        if self.images is not None:
            return self.images[index]
        return decode_pixels(self.paths[index])

    def __getitem__(self, index: int):
        # index may be "virtual" (training.EpochSampler): i + k*n is image i, with the
        # augmentation of epoch / repeat k.
        real = index % len(self)
        try:
            image = self.load(real)
        except ImageError as err:
            # A file that broke after the scan: warn and use a neighbour, not crash the epoch.
            log.warning("skipping %s", err)
            return self[(real + 1) % len(self)]
        if self.transform is None:
            return image, self.targets[real]
        if self.seed is None:
            return self.transform(image), self.targets[real]
        # Each sample's augmentation depends only on (seed, virtual index), whatever the
        # worker, the batch order or a resume mid-epoch; fork_rng keeps the caller's RNG
        # (dropout, MixUp) untouched when loading in the main process. Only the CPU
        # generator is seeded: torch.manual_seed also queues a seed for every accelerator
        # and records a stack trace each time: a quarter of the digits training time.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed * 1_000_000_007 + index)
            return self.transform(image), self.targets[real]

    def subset(self, indices, transform=None) -> ImageDataset:
        return ImageDataset(
            [self.paths[i] for i in indices],
            [self.targets[i] for i in indices],
            self.classes,
            transform,
            None if self.images is None else [self.images[i] for i in indices],
        )


@dataclass
class Splits:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    classes: list
    skipped: list  # "path: reason" for every file that could not be read


def scan_images(samples: list[tuple[str, int]], decode: bool = False, cache=None):
    """Drop files that are empty, not images, or cannot be decoded; returns (good samples,
    "path: reason" list, images or None). decode=False decodes JPEGs at 1/8 scale and keeps
    nothing (large datasets stay lazily decoded); decode=True decodes every pixel and returns
    the images as uint8 tensors (the in-memory cache) while `cache` (a dict holding "left",
    the bytes still free; CACHE_LIMIT_BYTES by default) lasts: past it, images is None."""
    cache = {"left": CACHE_LIMIT_BYTES} if cache is None else cache
    good, bad, images = [], [], [] if decode else None
    for path, label in samples:
        try:
            if images is None:
                decode_image(path, scale=8)
            else:
                images.append(decode_pixels(path))
                cache["left"] -= images[-1].numel()
                if cache["left"] < 0:
                    log.info("the decoded images pass %d bytes: not cached", CACHE_LIMIT_BYTES)
                    images = None
            good.append((path, label))
        except ImageError as err:
            bad.append(str(err))
    return good, bad, images


def image_files(folder: Path) -> list[str]:
    """The image files under `folder`, with the unsupported formats and broken links among
    them (so that the scan lists them as skipped, with the reason)."""
    suffixes = (*IMAGE_EXTENSIONS, *UNSUPPORTED)
    found = (f for f in folder.rglob("*") if f.suffix.lower() in suffixes)
    return sorted(str(f) for f in found if f.is_file() or f.is_symlink())


def class_folders(root: Path) -> dict[str, list[str]]:
    return {
        d.name: image_files(d)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }


def stratified_split(targets, fractions, seed: int) -> list[list[int]]:
    """Split indices class by class: the first part gets the rest, each other part
    round(n * fraction) of every class. Same targets and seed -> same split."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == label))
        start = 0
        for part, fraction in enumerate(fractions, start=1):
            take = min(int(round(len(idx) * fraction)), max(len(idx) - start - 1, 0))
            parts[part] += idx[start : start + take].tolist()
            start += take
        parts[0] += idx[start:].tolist()
    return [sorted(p) for p in parts]


def _from_samples(by_split: dict, classes: list, cfg) -> Splits:
    """by_split: {"train": [(path, label)], "val": [...] or None, "test": [...] or None}."""
    if len(classes) < 2:
        raise DataError(
            f"the data has {len(classes)} class ({', '.join(map(str, classes))}); a classifier "
            "needs at least 2: add images of another class (a folder or a label)"
        )
    skipped, cached, cache = [], {}, {"left": CACHE_LIMIT_BYTES}  # every image counts
    for name, samples in by_split.items():
        if samples is not None:
            by_split[name], bad, cached[name] = scan_images(samples, cfg.cache_images, cache)
            skipped += bad
    if skipped:
        log.warning("skipped %d unreadable file(s):\n  %s", len(skipped), "\n  ".join(skipped[:50]))
    train = by_split["train"]
    if not train:
        raise DataError("the training data holds no readable images; check --data")
    counts = np.bincount([label for _, label in train], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(
            f"class(es) {', '.join(empty[:10])} have no readable training images; add images "
            "or remove those folders"
        )
    full = ImageDataset(
        [p for p, _ in train], [t for _, t in train], classes, None, cached["train"]
    )
    missing = [name for name in ("val", "test") if by_split.get(name) is None]
    fractions = [cfg.val_fraction if m == "val" else cfg.test_fraction for m in missing]
    parts = stratified_split(full.targets, fractions, cfg.seed)
    datasets = {"train": full.subset(parts[0])}
    for name, part in zip(missing, parts[1:], strict=True):
        datasets[name] = full.subset(part)
    for name in ("val", "test"):
        if name not in datasets:
            samples = by_split[name]
            paths, targets = [p for p, _ in samples], [t for _, t in samples]
            datasets[name] = ImageDataset(paths, targets, classes, None, cached[name])
    check_not_empty(datasets, missing, cfg)
    return Splits(datasets["train"], datasets["val"], datasets["test"], classes, skipped)


def check_not_empty(datasets: dict, carved: list, cfg) -> None:
    """An empty split (by mistake: a fraction of 0 asks for none) in one clear error."""
    for name in (n for n in ("val", "test") if not len(datasets[n])):
        fraction = getattr(cfg, f"{name}_fraction")
        fix = "add images to it, or leave it out to carve it from the training images"
        if name in carved:  # stratified_split rounds each class's share, n * fraction
            fix = (f"give classes {int(0.5 / (fraction or 1)) + 1}+ images, raise --{name}-"
                   "fraction, or give the split (a folder, a CSV split column)")  # fmt: skip
        if fraction or name not in carved:
            raise DataError(f"the {name} split has no images; {fix}")


def load_digits_splits(cfg) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images / 16.0 * 255.0).round().to(torch.uint8)  # (N, 8, 8)
    pixels = v2.functional.resize(pixels.unsqueeze(1), [cfg.image_size] * 2, antialias=True)
    images = list(pixels.expand(-1, 3, -1, -1).contiguous())  # N x (3, S, S)
    classes = [str(c) for c in digits.target_names]
    full = ImageDataset(
        [f"digits/{i:04d}" for i in range(len(images))], digits.target, classes, images=images
    )
    train, val, test = stratified_split(
        full.targets, [cfg.val_fraction, cfg.test_fraction], cfg.seed
    )
    return Splits(full.subset(train), full.subset(val), full.subset(test), classes, [])


def load_folder_splits(root: Path, cfg) -> Splits:
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    found = {
        split: next((subdirs[n] for n in names if n in subdirs), None)
        for split, names in SPLIT_DIRS.items()
    }
    if found["train"] is None:  # class folders only
        folders = class_folders(root)
        if not folders:
            raise DataError(
                f"{root} has no class folders; expected {root}/<class>/<image> or "
                f"{root}/train/<class>/<image>"
            )
        classes = list(folders)
        samples = [(p, i) for i, c in enumerate(classes) for p in folders[c]]
        return _from_samples({"train": samples, "val": None, "test": None}, classes, cfg)
    train_folders = class_folders(found["train"])
    classes = list(train_folders)
    if not classes:
        raise DataError(f"{found['train']} has no class folders")
    by_split = {"train": [(p, i) for i, c in enumerate(classes) for p in train_folders[c]]}
    for split in ("val", "test"):
        if found[split] is None:
            by_split[split] = None
            continue
        folders = class_folders(found[split])
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise DataError(
                f"{found[split]} has class folder(s) not in train/: {', '.join(unknown[:10])}; "
                "every class needs training images"
            )
        by_split[split] = [(p, classes.index(c)) for c, paths in folders.items() for p in paths]
    return _from_samples(by_split, classes, cfg)


def load_csv_splits(path: Path, cfg) -> Splits:
    """A manifest such as MHIST's annotations.csv (manifest.py reads and checks it): paths
    relative to the CSV's folder (or its images/ subfolder), labels as names, an optional
    train/valid/test column. Every problem is a DataError naming the manifest."""
    try:
        rows = read_manifest(path)
    except ManifestError as err:
        raise DataError(str(err)) from None
    classes = sorted({row.label for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    by_split: dict = {"train": [], "val": None, "test": None}
    for row in rows:
        if by_split[row.split] is None:
            by_split[row.split] = []
        by_split[row.split].append((row.file, index[row.label]))
    try:
        return _from_samples(by_split, classes, cfg)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None


def load_torchvision_splits(name: str, cfg) -> Splits:
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
    try:
        train = cls(cfg.data_dir, train=True, download=True)
        test = cls(cfg.data_dir, train=False, download=True)
    except (OSError, RuntimeError) as err:
        raise DataError(
            f"could not download {name} into {cfg.data_dir} ({err}); with no internet, copy "
            f"the dataset files into {cfg.data_dir} or pass an image folder with --data"
        ) from None

    def as_dataset(ds, split: str) -> ImageDataset:
        data = torch.as_tensor(np.asarray(ds.data))  # (N, H, W, 3) or (N, H, W) uint8
        data = data.unsqueeze(-1).expand(*data.shape, 3) if data.ndim == 3 else data
        images = list(data.permute(0, 3, 1, 2).contiguous())
        paths = [f"{name}/{split}/{i:05d}" for i in range(len(images))]
        return ImageDataset(paths, list(map(int, ds.targets)), ds.classes, images=images)

    full, test_set = as_dataset(train, "train"), as_dataset(test, "test")
    train_idx, val_idx = stratified_split(full.targets, [cfg.val_fraction], cfg.seed)
    return Splits(full.subset(train_idx), full.subset(val_idx), test_set, full.classes, [])


def load_splits(cfg) -> Splits:
    """The train/val/test datasets and class names for `cfg.data` (no transforms yet)."""
    spec = str(cfg.data)
    if spec == "digits":
        return load_digits_splits(cfg)
    if spec.lower() in TORCHVISION_DATASETS:
        return load_torchvision_splits(spec.lower(), cfg)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".csv" and path.is_file():
        return load_csv_splits(path, cfg)
    if path.is_dir():
        return load_folder_splits(path, cfg)
    raise DataError(
        f"--data {spec!r} is not digits, a torchvision name ({', '.join(TORCHVISION_DATASETS)}), "
        "an existing image folder or a .csv manifest; check the path"
    )


def load_splits_for_model(cfg, classes: list[str]) -> Splits:
    """`load_splits`, refusing data whose classes are not the model's (same names, same order:
    the head's outputs are indices into them)."""
    splits = load_splits(cfg)
    if [str(c) for c in splits.classes] != [str(c) for c in classes]:
        raise DataError(
            f"the classes of {cfg.data} ({len(splits.classes)}) differ from the model's "
            f"({len(classes)}); use data with the same class folders as the model's training"
        )
    return splits


# ---- transforms and loaders ----------------------------------------------------------------


def eval_transform(image_size: int, mean, std) -> v2.Compose:
    """Resize the short side, center-crop, normalise: the same for validation, test,
    prediction and serving (the values come from the checkpoint there)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


@functools.cache
def loader_workers(requested: int) -> int:
    """The workers asked for, at most the usable cores (the affinity mask); says so once."""
    cores = default_threads()
    if requested > cores:
        log.warning(
            "num_workers %d lowered to %d, the cores this process may use", requested, cores
        )
    return min(requested, cores)


def make_loader(dataset, cfg, *, train: bool, sampler=None) -> DataLoader:
    workers = loader_workers(cfg.num_workers)
    return DataLoader(
        dataset,
        # Its own generator: creating worker seeds must not draw from the global RNG, so a
        # resumed run's dropout and MixUp draws match an uninterrupted run's.
        generator=torch.Generator().manual_seed(cfg.seed),
        batch_size=cfg.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) > cfg.batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def with_transforms(splits: Splits, cfg) -> Splits:
    """Attach the train transform to train and the eval transform to val and test."""
    evaluate = eval_transform(cfg.image_size, cfg.mean, cfg.std)
    splits.train.transform = train_transform(cfg)
    splits.val.transform = evaluate
    splits.test.transform = evaluate
    return splits
