"""Decoding any image file within a memory budget, every failure as one line (PIL and numpy only).

    from imagesafe import ImageError, open_image
    image = open_image("photo.jpg", size=224)     # RGB, short side under 4 x 224, or ImageError
    image = open_image(data, name="upload.png")   # bytes; no size: full resolution, same checks

A file's header says how large it is before a single pixel is decoded, and a few hundred bytes
can declare 12000 x 12000 pixels (1.6 GB to decode), so `open_image` decides on the header:

- JPEGs are decoded at a reduced scale (`draft`: 1/2 to 1/8, libjpeg skips the detail) when
  `size` (the model's input side) says the full scale is not needed;
- more than `max_pixels` still to decode is refused (default $MAX_IMAGE_PIXELS, else 40
  megapixels; about 160 MB to decode as RGBA), as is an aspect ratio over 100:1 (a 1 x 1,000,000
  strip is no picture, and resizing its short side to the model's input multiplies it);
- with `size`, the decoded image is shrunk by a whole factor (box filter) while its short side
  stays at least 2 x size, and a panorama longer than 4:1 keeps its centre (what the model's
  centre crop sees), so no full-size image outlives the call.

Every exception a decoder raises (OSError, EOFError, NotImplementedError, RuntimeError,
ValueError, SyntaxError, struct.error, MemoryError, DecompressionBombError...) becomes an
`ImageError` whose message is one line naming the file and the reason; formats Pillow cannot
read (SVG, PDF, HEIC, AVIF without its plugin, DDS and BLP variants) are named "unsupported
format".
"""

from __future__ import annotations

import errno
import io
import os
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# What a folder scan (training, predict.py, monitor.py) reads as images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

MAX_PIXELS_ENV = "MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 40_000_000  # a 7300 x 5500 photo; 64 model inputs of 790 px and more
MAX_ASPECT_RATIO = 100  # long side / short side: beyond it, refused
KEEP_ASPECT = 4  # with a size: a longer image is cropped to its centre, 4:1
MESSAGE_CHARS = 300  # a decoder's message is cut there (one line, never a dump)
# https://en.wikipedia.org/wiki/ISO_base_media_file_format: the brands of the `ftyp` box
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}
ORIENTATION = {  # EXIF orientation -> the transpose that shows the image upright (ImageOps')
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """One image that cannot be used; the message names the file and the reason."""


def pixel_limit(size: int | None = None) -> int:
    """The most pixels a decode may produce: $MAX_IMAGE_PIXELS when set, else 40 megapixels
    (raised for models whose input is so large that 64 of them exceed it)."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if value:
        try:
            limit = int(float(value))
        except ValueError:
            raise ValueError(f"{MAX_PIXELS_ENV}={value!r} is not a number of pixels") from None
        if limit < 1:
            raise ValueError(f"{MAX_PIXELS_ENV}={value!r} must be at least 1")
        return limit
    return max(DEFAULT_MAX_PIXELS, 64 * (size or 0) ** 2)


def open_image(
    source, *, size: int | None = None, max_pixels: int | None = None, name: str | None = None
) -> Image.Image:
    """A path, bytes or PIL image -> an RGB PIL image (EXIF rotation applied, transparency on
    white, 16-bit rescaled, first frame), or ImageError("<name>: <reason>", one line).

    size: the model's input side; the image is decoded and kept only as large as that needs
    (short side between 2 x size and 4 x size when it was larger). max_pixels: the budget
    (default pixel_limit(size)). name: how messages call the input (default: the path, or
    "upload" for bytes).
    """
    if name is None:
        name = "upload" if isinstance(source, (bytes, bytearray)) else str(source)
    if max_pixels is None:
        max_pixels = pixel_limit(size)
    try:
        if isinstance(source, Image.Image):
            check_shape(source.size, None, name)
            return _decoded(source, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open(source, name, max_pixels) as img:
                if size and img.format == "JPEG":
                    _draft(img, size)
                check_shape(img.size, max_pixels, name)
                img.seek(0)
                img.load()
                return _decoded(img, size)
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is this file's error
        raise ImageError(f"{name}: {describe(err, source)}") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk: empty, so its CRC is fixed


def plain_png(data: bytes, max_pixels: int | None = None) -> bool:
    """True for a complete, single-frame, 8-bit RGB or grey PNG without transparency, within
    the pixel budget (default pixel_limit()) and the aspect limit: any libpng decoder
    (OpenCV's) gives exactly open_image's pixels for it, and refuses what open_image refuses
    (every chunk has a CRC). Read from the chunks before the image data, no decoder involved;
    False for anything else, never an exception: open_image then decodes or names the error.
    """
    data = memoryview(data)
    if bytes(data[:8]) != PNG_SIGNATURE or bytes(data[-12:]) != b"\0\0\0\0" + PNG_END:
        return False
    if bytes(data[12:16]) != b"IHDR" or len(data) < 33:
        return False
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or colour not in (0, 2):  # 8-bit grey or RGB; palette, alpha: PIL
        return False
    try:
        check_shape((width, height), pixel_limit() if max_pixels is None else max_pixels, "")
    except ImageError:
        return False
    offset = 33
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = bytes(data[offset + 4 : offset + 8])
        if kind == b"IDAT":
            return True
        if kind in (b"tRNS", b"acTL"):  # transparency, or an animation
            return False
        offset += 12 + length
    return False


def check_shape(declared: tuple[int, int], max_pixels: int | None, name: str) -> None:
    """ImageError when `declared` (width, height) is over the budget or absurdly thin."""
    width, height = declared
    if width < 1 or height < 1:
        raise ImageError(f"{name}: refused, the header declares {width} x {height} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name}: refused, too many pixels ({width} x {height} = {width * height:,} over "
            f"the limit of {max_pixels:,}; set {MAX_PIXELS_ENV} to raise it)"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"{name}: refused, {width} x {height} pixels is thinner than "
            f"{MAX_ASPECT_RATIO}:1, not a picture to classify"
        )


def describe(err: BaseException, source=None) -> str:
    """A decoder's exception -> the reason, one line."""
    if isinstance(err, Image.DecompressionBombError):
        return f"refused, too many pixels ({_one_line(err)})"
    if isinstance(err, UnidentifiedImageError):
        kind = sniff(source)
        if kind:
            return f"unsupported format ({kind}); convert it to PNG or JPEG"
        return "not an image file (or an unsupported format)"
    if isinstance(err, NotImplementedError):
        return f"unsupported format (a variant Pillow cannot decode: {_one_line(err)})"
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return "a symbolic link loop"
    if isinstance(err, FileNotFoundError):
        dangling = isinstance(source, (str, os.PathLike)) and os.path.islink(source)
        return "no such file (a dangling symbolic link?)" if dangling else "no such file"
    if isinstance(err, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(err, MemoryError):
        return "refused, not enough memory to decode it"
    return f"unreadable image ({_one_line(err)})"


def sniff(source) -> str | None:
    """The name of a format Pillow does not read, from the file's first bytes, or None."""
    try:
        if isinstance(source, (bytes, bytearray)):
            head = bytes(source[:1024])
        else:
            with open(source, "rb") as f:
                head = f.read(1024)
    except (OSError, TypeError, ValueError):
        return None
    text = head.lstrip().lower()
    if text.startswith(b"%pdf"):
        return "PDF"
    if b"<svg" in text and (text.startswith(b"<?xml") or text.startswith(b"<svg")):
        return "SVG"
    if head[4:8] == b"ftyp":
        brands = {head[i : i + 4] for i in range(8, min(len(head), 64), 4)}
        if brands & AVIF_BRANDS:
            return "AVIF"
        if brands & HEIF_BRANDS:
            return "HEIC/HEIF"
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def _open(source, name: str, max_pixels: int) -> Image.Image:
    """Image.open (the header), after checking what an icon's frames declare: Pillow
    decodes an icon's largest frame as it opens it."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError(f"{name}: the file is empty (0 bytes)")
        frames = icon_frames(io.BytesIO(source))
    else:
        if os.path.getsize(source) == 0:
            raise ImageError(f"{name}: the file is empty (0 bytes)")
        with open(source, "rb") as f:
            frames = icon_frames(f)
    for declared in frames:
        check_shape(declared, max_pixels, name)
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


def icon_frames(f) -> list[tuple[int, int]]:
    """The sizes the frames of an ICO/CUR file (an open binary file) declare, [] for another
    format: its directory says at most 256 x 256, but a PNG or BMP frame inside says its own
    size, and Pillow decodes that one as it opens the file."""
    head = f.read(6)
    if len(head) < 6 or head[:4] not in (b"\0\0\1\0", b"\0\0\2\0"):
        return []
    (count,) = struct.unpack("<H", head[4:6])
    offsets = [struct.unpack("<I", f.read(16)[12:16])[0] for _ in range(count)]
    sizes = []
    for offset in offsets:
        f.seek(offset)
        frame = f.read(24)
        if frame.startswith(b"\x89PNG\r\n\x1a\n") and len(frame) == 24:
            sizes.append(struct.unpack(">II", frame[16:24]))
        elif len(frame) >= 12:
            width, height = struct.unpack("<ii", frame[4:12])  # BITMAPINFOHEADER
            sizes.append((abs(width), abs(height) // 2 or 1))  # the AND mask doubles it
    return sizes


def _draft(img: Image.Image, size: int) -> None:
    """Ask libjpeg for the smallest DCT scale whose short side is still at least 2 x size."""
    width, height = img.size
    scale = 2 * size / min(width, height)
    if scale < 1:
        img.draft(img.mode, (max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))))


def _decoded(img: Image.Image, size: int | None) -> Image.Image:
    """The loaded image, shrunk for `size` first (cheaper than converting all of it), then
    turned upright and RGB."""
    orientation = img.getexif().get(0x0112)
    sixteen_bit = img.mode.startswith("I;16")  # fit may widen it to "I"
    if size:
        img = fit(img, size)
    if orientation in ORIENTATION:
        img = img.transpose(ORIENTATION[orientation])
    return to_rgb(img, sixteen_bit)


def fit(img: Image.Image, size: int) -> Image.Image:
    """An image much larger than the model needs -> its centre (at most 4:1) shrunk by a
    whole factor, short side still at least 2 x size. Smaller images are returned as they are,
    so they preprocess exactly as at evaluation."""
    width, height = img.size
    short = min(width, height)
    if max(width, height) > KEEP_ASPECT * short:
        keep = KEEP_ASPECT * short
        left, top = (width - min(width, keep)) // 2, (height - min(height, keep)) // 2
        img = img.crop((left, top, left + min(width, keep), top + min(height, keep)))
    factor = short // (2 * size)
    if factor < 2:
        return img
    if img.mode in ("1", "I;16", "I;16B", "I;16L", "I;16N"):
        img = img.convert("L" if img.mode == "1" else "I")
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img.reduce(factor)


def to_rgb(img: Image.Image, sixteen_bit: bool = False) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16-bit and float images rescaled
    rather than clipped (EXIF rotation is _decoded's; sixteen_bit: an "I" image that was
    16-bit, scaled from 65535 whatever its largest value)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if sixteen_bit or img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")
