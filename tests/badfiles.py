"""A corpus of awkward and hostile image files, generated on the fly (nothing binary in git).

`make_corpus(folder)` returns {name: (path, expected)} where expected is "ok" (must decode,
with correct orientation and colour) or "refused" (must be rejected with a clear message).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_bomb(path: Path, side: int = 30000) -> None:
    """A valid PNG header claiming side x side pixels, with a tiny compressed body: a few KB
    on disk, 900 megapixels if decoded. Written by hand so generating it costs nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    row = b"\x00" + b"\x00" * side
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def make_corpus(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}

    def add(name: str, expected: str) -> Path:
        path = folder / name
        out[name.rsplit(".", 1)[0]] = (path, expected)
        return path

    add("zero_byte.jpg", "refused").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(good, "JPEG")
    add("truncated.jpg", "refused").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    add("text_named.jpg", "refused").write_text("this is not an image\n" * 20)
    add("html_named.png", "refused").write_text("<!doctype html><html><body>hi</body></html>")
    _png_bomb(add("bomb.png", "refused"))
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(add("cmyk.jpg", "ok"))  # red
    arr16 = np.full((40, 40), 65535 // 2, np.uint16)
    Image.fromarray(arr16).save(add("gray16.png", "ok"))
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 1 = blue
    pal.info["transparency"] = 0
    pal.save(add("palette_alpha.png", "ok"), transparency=0)
    frames = [Image.new("RGB", (40, 40), c) for c in ((0, 255, 0), (255, 0, 0))]
    frames[0].save(add("animated.gif", "ok"), save_all=True, append_images=frames[1:])
    # EXIF orientation 6 (rotate 90 CW to display): stored 60 wide x 30 high -> shown 30 x 60.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 30), (255, 255, 255)).save(add("exif_rotated.jpg", "ok"), exif=exif)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(add("one_pixel.png", "ok"))
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
    Image.fromarray(big).save(add("huge_photo.jpg", "ok"), quality=70)
    return out
