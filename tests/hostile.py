"""Hostile inputs for issue 26, generated on the fly (nothing binary in git), each small on disk.

    huge_images(folder)       {name: (path, declared pixels)}: headers that declare huge sizes
                              under PIL's refusal limit, in every format where that is cheap
    broken_images(folder)     {name: (path, exception type)}: what PIL raises on open, seek(0)
                              or load, one case for each decoder exception type
    bad_checkpoints(ckpt)     {name: checkpoint dict}: a real checkpoint with one field wrong
    deflate_bomb_checkpoint(ckpt, path)   a checkpoint file whose tensor data inflates 1000x
    bad_manifests(folder)     {name: (csv path, problem)}: CSV manifests beside real images
    bad_configs()             {name: overrides}: config values that cannot train

Nothing here allocates the sizes it declares: huge images are written by patching the header
of a small one, or by streaming compressed data of a constant image, so the whole corpus
builds in about a second.
"""

from __future__ import annotations

import copy
import io
import math
import random
import struct
import zipfile
import zlib
from pathlib import Path

from PIL import Image, UnidentifiedImageError, features

BIG = 12000  # 144 megapixels: under PIL's 179-megapixel refusal, over its warning limit
BIG_1BIT = 13000  # 169 megapixels, 1 bit a pixel on disk, 1 byte (mode "1") or 3 (RGB) decoded
STRIP = 1_000_000  # a 1-pixel strip: resizing its short side to the model's size multiplies it


# ---- building blocks -----------------------------------------------------------------------


def _small(fmt: str, mode: str = "L", size=(16, 16), **params) -> bytearray:
    """A small constant image saved in `fmt`, as bytes to patch."""
    buf = io.BytesIO()
    Image.new(mode, size, 0 if mode == "1" else 128).save(buf, fmt, **params)
    return bytearray(buf.getvalue())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A valid PNG of a constant (all zero) image, compressed row block by row block, so a
    13000 x 13000 image costs a few MB of zeros at a time, never its raster."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    row = bytes(1 + (width * channels * bit_depth + 7) // 8)  # filter byte 0, then zeros
    rows_per_block = max(1, (1 << 22) // len(row))
    compressor = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_huge(side: int) -> bytes:
    """A small RGB JPEG with its frame header patched to side x side and its entropy-coded
    data cut after the scan header: libjpeg then decodes every pixel of the declared size
    as grey (a few hundred bytes on disk)."""
    data = _small("JPEG", "RGB")
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, side, side)  # height, width
    sos = data.index(b"\xff\xda")
    (length,) = struct.unpack(">H", data[sos + 2 : sos + 4])
    return bytes(data[: sos + 2 + length]) + b"\xff\xd9"


def _webp_huge(side: int) -> bytes:
    """A lossless WebP of a constant image: every Huffman code has one symbol, so pixels
    take no bits and the VP8L header's size can be patched at will (max 16384)."""
    data = _small("WEBP", "RGB", lossless=True, method=0)
    at = data.index(b"VP8L") + 9  # chunk tag, chunk size, signature byte
    (bits,) = struct.unpack("<I", data[at : at + 4])
    bits = (bits & ~((1 << 28) - 1)) | (side - 1) | ((side - 1) << 14)
    struct.pack_into("<I", data, at, bits)
    return bytes(data)


def _j2k_huge(side: int) -> bytes:
    """A JPEG 2000 codestream whose SIZ marker declares side x side in one tile with no
    tile data: OpenJPEG decodes the missing data as zeros (137 bytes on disk)."""
    data = _small("JPEG2000", no_jp2=True)
    siz = data.index(b"\xff\x51")
    struct.pack_into(">II", data, siz + 6, side, side)  # Xsiz, Ysiz
    struct.pack_into(">II", data, siz + 22, side, side)  # XTsiz, YTsiz
    return bytes(data)


def _bmp_rle8_huge(side: int) -> bytes:
    """An 8-bit RLE BMP: 'delta' escapes skip 255 rows each, runs fill the last row."""
    pixels = b""
    rows = side - 1
    while rows > 0:
        pixels += bytes([0, 2, 0, min(255, rows)])
        rows -= min(255, rows)
    left = side
    while left > 0:
        pixels += bytes([min(255, left), 0])
        left -= min(255, left)
    pixels += b"\x00\x01"  # end of bitmap
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(pixels), 0, 0, 256, 0)
    offset = 14 + len(info) + len(palette)
    head = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return head + info + palette + pixels


def _tiff(width: int, height: int, compression: int, data: bytes, photometric: int = 0) -> bytes:
    """A minimal little-endian bilevel TIFF with one strip."""
    entries = [
        (256, 4, width),  # ImageWidth
        (257, 4, height),  # ImageLength
        (258, 3, 1),  # BitsPerSample
        (259, 3, compression),
        (262, 3, photometric),  # 0: WhiteIsZero
        (273, 4, 0),  # StripOffsets, filled in below
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, height),  # RowsPerStrip
        (279, 4, len(data)),  # StripByteCounts
    ]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    return out + b"\x00\x00\x00\x00" + data


def _tiff_g4_huge(side: int) -> bytes:
    """CCITT group 4: an all-white row identical to the one above is one bit (V0), so a
    13000 x 13000 page takes 1.7 KB."""
    rows = b"\xff" * (side // 8) + bytes([(0xFF << (8 - side % 8)) & 0xFF] if side % 8 else [])
    return _tiff(side, side, 4, rows + b"\x00\x10\x01")  # EOFB: two EOL codes


def _ico_with_png(png: bytes) -> bytes:
    """An icon whose directory says 256 x 256 but whose PNG frame is whatever `png` is."""
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def _gif_huge(side: int) -> bytes:
    """A GIF whose screen and frame declare side x side with one LZW code of data."""
    head = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0)
    codes = 4 | (0 << 3) | (5 << 6)  # clear, pixel 0, end of information (3-bit codes)
    return head + frame + bytes([2, 2, codes & 0xFF, codes >> 8, 0]) + b"\x3b"


def _patched(fmt: str, fmt_struct: str, offset: int, values, mode: str = "L", **params):
    data = _small(fmt, mode, **params)
    struct.pack_into(fmt_struct, data, offset, *values)
    return bytes(data)


# ---- huge declared sizes --------------------------------------------------------------------


def huge_images(folder: Path) -> dict[str, tuple[Path, int]]:
    """{name: (path, declared pixels)}: files whose header declares a huge image, every one
    under PIL's decompression-bomb refusal (2 x MAX_IMAGE_PIXELS), each at most ~20 KB.

    Those marked "decodes" in the comments decode in full (the memory attack); the others
    are truncated after the header, so they fail on load, but only after PIL has set up
    the full-size image, and a checker that trusts the header alone is fooled by them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    s, b = BIG, BIG_1BIT
    cases: dict[str, tuple[str, bytes, int]] = {
        # decodes: the JPEG (432 MB as RGB), its 1-bit PNG and its 1 x 1,000,000 strip
        "jpeg_12000": ("jpeg_12000.jpg", _jpeg_huge(s), s * s),
        "png_1bit_13000": ("png_1bit_13000.png", png_bytes(b, b, 1), b * b),
        "png_strip_tall": ("png_strip_tall.png", png_bytes(1, STRIP), STRIP),
        "png_strip_wide": ("png_strip_wide.png", png_bytes(STRIP, 1), STRIP),
        # decodes: 36 bytes, RGB(A) 12000 x 12000 (about 2 GB peak in PIL alone)
        "webp_lossless_12000": ("webp_lossless_12000.webp", _webp_huge(s), s * s),
        "bmp_rle8_12000": ("bmp_rle8_12000.bmp", _bmp_rle8_huge(s), s * s),
        "tiff_g4_13000": ("tiff_g4_13000.tif", _tiff_g4_huge(b), b * b),
        "ico_png_13000": ("ico_png_13000.ico", _ico_with_png(png_bytes(b, b, 1)), b * b),
        # truncated after the header: OSError or ValueError on load
        "gif_12000": ("gif_12000.gif", _gif_huge(s), s * s),
        "ppm_12000": ("ppm_12000.ppm", f"P6\n{s} {s}\n255\n".encode() + bytes(64), s * s),
        "pbm_plain_12000": ("pbm_plain_12000.pbm", f"P1\n{s} {s}\n".encode() + b"0 " * 64, s * s),
        "tga_rle_12000": ("tga_rle_12000.tga", _patched("TGA", "<HH", 12, (s, s), rle=True), s * s),
        "qoi_12000": ("qoi_12000.qoi", _patched("QOI", ">II", 4, (s, s), "RGB"), s * s),
        "pcx_12000": ("pcx_12000.pcx", _patched("PCX", "<HH", 8, (s - 1, s - 1)), s * s),
        "sgi_12000": ("sgi_12000.sgi", _patched("SGI", ">HH", 6, (s, s)), s * s),
        "dds_12000": ("dds_12000.dds", _patched("DDS", "<II", 12, (s, s), "RGBA"), s * s),
    }
    if features.check("jpg_2000"):
        # decodes: OpenJPEG fills the missing tile with zeros
        cases["j2k_12000"] = ("j2k_12000.j2k", _j2k_huge(s), s * s)
    out = {}
    for name, (filename, data, pixels) in cases.items():
        path = folder / filename
        path.write_bytes(data)
        out[name] = (path, pixels)
    return out


# ---- every decoder exception type ---------------------------------------------------------


def _spider() -> bytes:
    """A valid SPIDER image: PIL opens it, and seek(0) raises EOFError (not a stack)."""
    buf = io.BytesIO()
    Image.new("F", (16, 16), 1.0).save(buf, "SPIDER")
    return buf.getvalue()


def _dds_unknown_fourcc() -> bytes:
    """A DDS header with a FourCC PIL does not implement: NotImplementedError on open."""
    pixel_format = struct.pack("<2I", 32, 0x4) + b"ABCD" + bytes(20)
    header = struct.pack("<7I", 124, 0x1007, 16, 16, 0, 0, 0) + bytes(44) + pixel_format
    return b"DDS " + header + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + bytes(256)


def _blp1_unknown_encoding() -> bytes:
    """A BLP1 header with palette compression and encoding 3: NotImplementedError
    (BLPFormatError) on load."""
    head = (
        b"BLP1" + struct.pack("<iI", 1, 0) + struct.pack("<II", 16, 16) + struct.pack("<ii", 3, 0)
    )
    return head + bytes(16 * 4 * 2 + 1024)


def _avif_runtime_error() -> bytes | None:
    """A small AVIF with the first single-byte change that makes libavif fail with
    RuntimeError on open or load (searched, so that it survives encoder versions)."""
    if not features.check("avif"):
        return None
    good = bytes(_small("AVIF", "RGB"))
    for i in range(len(good)):
        for value in (0, 0xFF):
            data = bytearray(good)
            data[i] = value
            try:
                with Image.open(io.BytesIO(bytes(data))) as img:
                    img.load()
            except RuntimeError as err:
                if type(err) is RuntimeError:
                    return bytes(data)
            except Exception:  # noqa: BLE001,S112 - other failures are other cases
                continue
    return None


def _truncated(fmt: str, mode: str = "RGB", **params) -> bytes:
    data = _small(fmt, mode, size=(64, 64), **params)
    return bytes(data[: len(data) * 2 // 3])


SVG = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<rect width="64" height="64" fill="red"/></svg>\n'
)
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 64 64]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)
HEIC = struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic" + bytes(64)


def broken_images(folder: Path) -> dict[str, tuple[Path, type[BaseException]]]:
    """{name: (path, exception type)}: what `Image.open(path)`, `.seek(0)` and `.load()`
    raise for each file, one case or more for every type a decoder raises."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[str, bytes | None, type[BaseException]]] = {
        "truncated_jpeg": ("truncated.jpg", _truncated("JPEG"), OSError),
        "truncated_png": ("truncated.png", _truncated("PNG"), OSError),
        "truncated_gif": ("truncated.gif", _truncated("GIF", "P"), OSError),
        "truncated_tiff": ("truncated.tif", _truncated("TIFF", "RGB"), OSError),
        "truncated_bmp": ("truncated.bmp", _truncated("BMP"), OSError),
        "spider": ("spider.spi", _spider(), EOFError),
        "dds_unknown_fourcc": ("unknown_fourcc.dds", _dds_unknown_fourcc(), NotImplementedError),
        "blp1_unknown_encoding": ("encoding3.blp", _blp1_unknown_encoding(), NotImplementedError),
        "avif_corrupt": ("corrupt.avif", _avif_runtime_error(), RuntimeError),
        "random_bytes": ("random.jpg", random.Random(0).randbytes(2048), UnidentifiedImageError),
        "svg": ("drawing.svg", SVG, UnidentifiedImageError),
        "svg_named_png": ("drawing_svg.png", SVG, UnidentifiedImageError),
        "pdf": ("document.pdf", PDF, UnidentifiedImageError),
        "heic": ("photo.heic", HEIC, UnidentifiedImageError),
        "zero_byte": ("zero_byte.png", b"", UnidentifiedImageError),
    }
    out: dict[str, tuple[Path, type[BaseException]]] = {}
    for name, (filename, data, error) in cases.items():
        if data is None:  # a codec this Pillow lacks
            continue
        path = folder / filename
        path.write_bytes(data)
        out[name] = (path, error)
    loop = folder / "loop.png"
    loop.symlink_to(loop.name)  # a link to itself: ELOOP
    out["symlink_loop"] = (loop, OSError)
    dangling = folder / "dangling.png"
    dangling.symlink_to("no_such_target.png")
    out["dangling_symlink"] = (dangling, FileNotFoundError)
    directory = folder / "folder.jpg"
    directory.mkdir()
    out["directory_named_jpg"] = (directory, IsADirectoryError)
    return out


def open_and_load(path) -> Image.Image:
    """What every decoder of the project does first: open, first frame, decode."""
    img = Image.open(path)
    img.seek(0)
    img.load()
    return img


# ---- malformed checkpoints ------------------------------------------------------------------


def bad_checkpoints(checkpoint: dict) -> dict[str, dict]:
    """{name: checkpoint}: a deep copy of a real (smoke) checkpoint with one thing wrong,
    each loadable with torch.load(weights_only=True). Those marked "huge" would make
    today's loader build a model of tens of GB."""
    import torch

    def mutate(change) -> dict:
        ckpt = copy.deepcopy(checkpoint)
        change(ckpt)
        return ckpt

    def weight_names(ckpt) -> list[str]:
        return [k for k, v in ckpt["state_dict"].items() if v.is_floating_point()]

    def set_nan(ckpt, value=math.nan):
        name = weight_names(ckpt)[0]
        ckpt["state_dict"][name] = ckpt["state_dict"][name].clone().fill_(value)

    def head(ckpt) -> str:
        return [k for k in ckpt["state_dict"] if k.endswith("weight")][-1]

    def wrong_shape(ckpt):
        name = weight_names(ckpt)[0]
        ckpt["state_dict"][name] = torch.zeros(*(d + 1 for d in ckpt["state_dict"][name].shape))

    n = len(checkpoint["classes"])
    cases = {
        "format_version_str": lambda c: c.update(format_version="1"),
        "format_version_none": lambda c: c.update(format_version=None),
        "format_version_list": lambda c: c.update(format_version=[1]),
        "format_missing": lambda c: c.pop("format"),
        "config_list": lambda c: c.update(config=list(c["config"].items())),
        "config_none": lambda c: c.update(config=None),
        "config_str": lambda c: c.update(config="vit"),
        "state_dict_list": lambda c: c.update(state_dict=list(c["state_dict"].values())),
        "state_dict_value_str": lambda c: c["state_dict"].update(
            {next(iter(c["state_dict"])): "weights"}
        ),
        "tokenizer_unknown": lambda c: c["config"].update(tokenizer="hexagon"),
        "pool_unknown": lambda c: c["config"].update(pool="max"),
        "arch_unknown": lambda c: c["config"].update(arch="no_such_net"),
        "arch_not_a_model": lambda c: c["config"].update(arch="list_models"),  # a function
        "depth_str": lambda c: c["config"].update(depth="six"),
        "depth_float": lambda c: c["config"].update(depth=2.5),
        "depth_zero": lambda c: c["config"].update(depth=0),
        "embed_dim_none": lambda c: c["config"].update(embed_dim=None),
        "num_heads_not_dividing": lambda c: c["config"].update(num_heads=5),
        "patch_size_not_dividing": lambda c: c["config"].update(patch_size=5),
        "mlp_ratio_str": lambda c: c["config"].update(mlp_ratio="wide"),
        "depth_200000": lambda c: c["config"].update(depth=200_000),  # huge
        "image_size_100000": lambda c: (  # huge
            c["config"].update(image_size=100_000),
            c["preprocessing"].update(image_size=100_000),
        ),
        "preprocessing_not_dict": lambda c: c.update(preprocessing=[16, 0.5, 0.5]),
        "preprocessing_no_std": lambda c: c["preprocessing"].pop("std"),
        "preprocessing_no_mean": lambda c: c["preprocessing"].pop("mean"),
        "preprocessing_no_image_size": lambda c: c["preprocessing"].pop("image_size"),
        "preprocessing_image_size_str": lambda c: c["preprocessing"].update(image_size="16px"),
        "preprocessing_image_size_mismatch": lambda c: c["preprocessing"].update(
            image_size=c["preprocessing"]["image_size"] * 2
        ),
        "std_zero": lambda c: c["preprocessing"].update(std=[0.0, 0.0, 0.0]),
        "std_negative": lambda c: c["preprocessing"].update(std=[-0.5, -0.5, -0.5]),
        "mean_two_values": lambda c: c["preprocessing"].update(mean=[0.5, 0.5]),
        "mean_nan": lambda c: c["preprocessing"].update(mean=[math.nan] * 3),
        "nan_weights": set_nan,
        "inf_weights": lambda c: set_nan(c, math.inf),
        "shape_mismatch": wrong_shape,
        "missing_tensor": lambda c: c["state_dict"].pop(next(iter(c["state_dict"]))),
        "classes_str": lambda c: c.update(classes=",".join(c["classes"])),
        "classes_ints": lambda c: c.update(classes=list(range(n))),
        "classes_none": lambda c: c.update(classes=None),
        "classes_empty": lambda c: c.update(classes=[]),
        "classes_duplicate": lambda c: c.update(classes=[c["classes"][0]] * n),
        "classes_more_than_head": lambda c: c.update(classes=[*c["classes"], "extra"]),
        "classes_fewer_than_head": lambda c: c.update(classes=c["classes"][:-1]),
        "threshold_str": lambda c: c.update(threshold="high"),
        "threshold_out_of_range": lambda c: c.update(threshold=7.0),
        "head_rows_mismatch": lambda c: c["state_dict"].update(
            {head(c): c["state_dict"][head(c)][:-1].clone()}
        ),
    }
    return {name: mutate(change) for name, change in cases.items()}


HUGE_CHECKPOINTS = ("depth_200000", "image_size_100000")


def deflate_bomb_checkpoint(checkpoint: dict, path: Path, mebibytes: int = 256) -> Path:
    """Write `checkpoint` plus a tensor of `mebibytes` MiB of zeros stored deflated in the
    zip (torch's reader inflates it): ~1 KB of file per MB of memory, 256 MB from 260 KB.

    The tensor goes under `reference`, so today's loader accepts the file after inflating it.
    """
    import torch

    marker = 123_457  # numel of the placeholder, patched in the pickle to the declared size
    numel = mebibytes * 1024 * 1024 // 4
    ckpt = dict(checkpoint, reference={"bomb": torch.zeros(marker)})
    plain = io.BytesIO()
    torch.save(ckpt, plain)
    source = zipfile.ZipFile(plain)
    key = None
    with zipfile.ZipFile(path, "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                old = struct.pack("<I", marker)
                if data.count(old) != 2:  # storage size and tensor shape, nothing else
                    raise RuntimeError("placeholder size not unique in the pickle")
                data = data.replace(old, struct.pack("<I", numel))
            elif "/data/" in info.filename and info.file_size == marker * 4:
                key = info.filename
                entry = zipfile.ZipInfo(info.filename)
                entry.compress_type = zipfile.ZIP_DEFLATED
                block = bytes(1 << 20)
                with out.open(entry, "w", force_zip64=True) as f:
                    for _ in range(numel * 4 >> 20):
                        f.write(block)
                continue
            out.writestr(info, data)
    if key is None:
        raise RuntimeError("placeholder tensor not found in the archive")
    return path


# ---- manifests and configs ------------------------------------------------------------------


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value, 255 - value, 128)).save(path)


def bad_manifests(folder: Path) -> dict[str, tuple[Path, str]]:
    """{name: (manifest path, what is wrong)}: CSV manifests (path,label) beside real PNGs
    in folder/images/, each with one problem the loader must name."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(12):
        name = f"img{i:02d}.png"
        _image(folder / "images" / name, i * 20)
        files.append(name)
    good = [(f, "cat" if i % 2 else "dog") for i, f in enumerate(files)]

    def rows(pairs) -> str:
        return "".join(f"{p},{label}\n" for p, label in pairs)

    header = "path,label\n"
    cases: dict[str, tuple[bytes, str]] = {
        "row_without_label": (
            (header + rows(good) + f"{files[0]}\n").encode(),
            "a row has no label",
        ),
        "latin1_bytes": (
            (header + rows(good[:-1]) + f"{files[-1]},caf\xe9\n").encode("latin-1"),
            "not UTF-8",
        ),
        "utf8_bom_header": (
            b"\xef\xbb\xbf" + (header + rows(good)).encode(),
            "a byte order mark before the header (must be accepted)",
        ),
        "empty_label": ((header + rows(good) + f"{files[0]},\n").encode(), "an empty label"),
        "duplicate_conflicting": (
            (header + rows(good) + f"{files[0]},cat\n{files[0]},dog\n").encode(),
            "the same file twice with different labels",
        ),
        "one_image_per_class": (
            (header + rows([(files[0], "cat"), (files[1], "dog")])).encode(),
            "too few images to split into train, validation and test",
        ),
        "one_class": ((header + rows((f, "cat") for f in files)).encode(), "a single class"),
    }
    out = {}
    for name, (data, problem) in cases.items():
        path = folder / f"{name}.csv"
        path.write_bytes(data)
        out[name] = (path, problem)
    return out


def bad_configs() -> dict[str, dict]:
    """{name: overrides}: values that type-check but cannot train; apply them over the
    smoke preset (`--config file.json` or Config.from_dict)."""
    return {
        "depth_200000": {"depth": 200_000},
        "image_size_100000": {"image_size": 100_000},
        "seed_negative": {"seed": -1},
        "num_workers_1000": {"num_workers": 1000},
        "val_fraction_0": {"val_fraction": 0.0},
        "test_fraction_0": {"test_fraction": 0.0},
    }
