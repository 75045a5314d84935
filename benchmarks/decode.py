"""PIL against OpenCV for the training decode: speed on PNG and JPEG, and what each accepts
from corrupted JPEGs (why preprocessing.decode_pixels gives OpenCV the plain PNGs only).

    .venv/bin/python benchmarks/decode.py
    .venv/bin/python benchmarks/decode.py --quick

Images are generated (seed 0; smooth content, so they compress like photos): 32 px (CIFAR),
224 px and 800 x 600, each saved as PNG and as JPEG (quality 90). Per image and format, one
thread, best of --repeats: PIL (`preprocessing.decode_image` -> uint8 tensor, what training
did before) against OpenCV (`cv2.imdecode` + BGR->RGB), and `decode_pixels` (what training
does now). Every pair is checked to give the same pixels. Then --corrupt copies of a 160 x 120
JPEG get 1-20 random bytes overwritten past the header: counted are the copies PIL refuses
but OpenCV decodes without an error (into grey blocks). Writes a Markdown table to stdout and
metadata/results/decode.json.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "source"))

import preprocessing as P  # noqa: E402

SHAPES = {"32 px": (32, 32), "224 px": (224, 224), "800x600": (600, 800)}


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def opencv(path: str) -> torch.Tensor:
    bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)


def pil(path: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(P.decode_image(path))).permute(2, 0, 1)


def best_us(fn, path: str, repeats: int, calls: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(path)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def speed_rows(folder: Path, repeats: int, quick: bool) -> list[dict]:
    rows = []
    for label, (height, width) in SHAPES.items():
        if quick and label == "800x600":
            continue
        pixels = smooth_image(height, width)
        calls = max(3, 20_000 // (height * width // 64))
        calls = min(calls, 20) if quick else calls
        for fmt, params in (("PNG", {}), ("JPEG", {"quality": 90})):
            path = str(folder / f"{label.replace(' ', '')}.{fmt.lower()}")
            Image.fromarray(pixels).save(path, fmt, **params)
            same = torch.equal(pil(path), opencv(path)) and torch.equal(
                pil(path), P.decode_pixels(path)
            )
            times = {f.__name__: best_us(f, path, repeats, calls) for f in (pil, opencv)}
            times["decode_pixels"] = best_us(P.decode_pixels, path, repeats, calls)
            rows.append({"image": label, "format": fmt, "same_pixels": same, **times})
    return rows


def corrupt_counts(copies: int, seed: int = 1) -> dict:
    buf = io.BytesIO()
    Image.fromarray(smooth_image(120, 160)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    rng = random.Random(seed)
    counts = {"copies": copies, "pil_refuses": 0, "opencv_decodes_what_pil_refuses": 0}
    for _ in range(copies):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            damaged[rng.randrange(len(data) // 3, len(data) - 2)] = rng.randrange(256)
        try:
            P.decode_image(bytes(damaged))
            continue
        except P.ImageError:
            counts["pil_refuses"] += 1
        if cv2.imdecode(np.frombuffer(bytes(damaged), np.uint8), cv2.IMREAD_COLOR) is not None:
            counts["opencv_decodes_what_pil_refuses"] += 1
    return counts


def table(rows: list[dict]) -> str:
    lines = [
        "| image | format | PIL (us) | OpenCV (us) | OpenCV / PIL | decode_pixels / PIL "
        "| same pixels |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['image']} | {r['format']} | {r['pil']:.0f} | {r['opencv']:.0f} "
            f"| {r['opencv'] / r['pil']:.2f}x | {r['decode_pixels'] / r['pil']:.2f}x "
            f"| {'yes' if r['same_pixels'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few calls (tests)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best counts")
    parser.add_argument("--corrupt", type=int, default=300, help="corrupted JPEG copies")
    parser.add_argument("--out", type=Path, default=ROOT / "metadata/results/decode.json")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        rows = speed_rows(Path(folder), args.repeats, args.quick)
    counts = corrupt_counts(30 if args.quick else args.corrupt)
    print(table(rows))
    print(
        f"\nCorrupted JPEGs: PIL refuses {counts['pil_refuses']} of {counts['copies']}; OpenCV "
        f"decodes {counts['opencv_decodes_what_pil_refuses']} of those without an error."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"speed": rows, "corrupt_jpeg": counts}, indent=2) + "\n")
    return 0 if all(r["same_pixels"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
