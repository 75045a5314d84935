"""Reading a CSV manifest (path, label, optional split), every problem in one line with its row.

    rows = read_manifest(Path("annotations.csv"))   # [Row(file, label, split, line), ...]

The file is UTF-8, with or without the byte order mark Excel writes ("CSV UTF-8"); another
encoding is refused with the byte and line that show it. A row without a path or a label is
refused with its line number; the same file listed twice with the same label and split is
reported once and kept once, and with different labels or splits it is refused (one image in
two classes, or in train and test, would make the scores meaningless).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("preprocessing")

SPLIT_NAMES = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
# The column names a manifest may use, lower-case; path and label are required.
CSV_COLUMNS = {
    "path": ("path", "filepath", "file", "filename", "image", "image name", "image_path"),
    "label": ("label", "class", "target", "category", "majority vote label"),
    "split": ("split", "partition", "set", "subset"),
}


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class Row:
    file: str  # the image's path, resolved against the manifest's folder
    label: str
    split: str  # train | val | test
    line: int  # line number in the manifest (the header is line 1)


def read_text(path: Path) -> str:
    """The manifest as text: UTF-8, a leading byte order mark dropped."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ManifestError(
            f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it "
            'as UTF-8 (in Excel: Save As "CSV UTF-8")'
        ) from None


def pick_column(header: list[str], what: str, path: Path) -> str | None:
    lowered = {h.strip().lower(): h for h in header if h is not None}
    found = next((lowered[n] for n in CSV_COLUMNS[what] if n in lowered), None)
    if found is None and what != "split":
        raise ManifestError(f"{path} has no {what} column; name one of: "
                            f"{', '.join(CSV_COLUMNS[what])} (found: {', '.join(header)})")  # fmt: skip
    return found


def _resolve(path: Path, value: str) -> str:
    rel = Path(value)
    # Relative to the manifest first (an absolute path stays itself), never the cwd.
    candidates = [path.parent / rel, path.parent / "images" / rel]
    return str(next((c for c in candidates if c.is_file()), candidates[0]))


def _cell(row: dict, column: str | None) -> str:
    value = row.get(column) if column else None
    return value.strip() if isinstance(value, str) else ""


def read_manifest(path: Path) -> list[Row]:
    """The rows of a manifest, checked (see the module docstring); ManifestError otherwise."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    if not reader.fieldnames:
        raise ManifestError(f"{path} is empty; it needs a header row (path,label) and rows")
    path_col, label_col, split_col = (pick_column(reader.fieldnames, c, path) for c in CSV_COLUMNS)
    rows: list[Row] = []
    for record in reader:
        line = reader.line_num
        if not any(v.strip() for v in record.values() if isinstance(v, str)):
            continue  # a blank line
        file, label = _cell(record, path_col), _cell(record, label_col)
        if not file or not label:
            what = "path" if not file else "label"
            raise ManifestError(
                f"{path} line {line}: no {what} (columns {path_col}, {label_col}); give every "
                f"row an image path and a label, or delete the row"
            )
        split_name = _cell(record, split_col).lower() or "train"
        split = next((s for s, names in SPLIT_NAMES.items() if split_name in names), None)
        if split is None:
            raise ManifestError(
                f"{path} line {line}: split {record[split_col]!r} is not train, valid or test"
            )
        rows.append(Row(_resolve(path, file), label, split, line))
    if not rows:
        raise ManifestError(f"{path} has no rows")
    return without_duplicates(rows, path)


def without_duplicates(rows: list[Row], path: Path) -> list[Row]:
    """Each file once: exact repeats reported and dropped, conflicting ones refused."""
    first: dict[str, Row] = {}
    repeats = []
    for row in rows:
        seen = first.setdefault(str(Path(row.file).resolve()), row)
        if seen is row:
            continue
        if (seen.label, seen.split) != (row.label, row.split):
            raise ManifestError(
                f"{path} lines {seen.line} and {row.line} list {row.file} twice, as "
                f"{seen.label!r} ({seen.split}) and {row.label!r} ({row.split}); keep one row"
            )
        repeats.append(row)
    if repeats:
        lines = ", ".join(str(r.line) for r in repeats[:10])
        log.warning(
            "%s: %d duplicate row(s) ignored (lines %s%s): the same file and label as an "
            "earlier row",
            path,
            len(repeats),
            lines,
            ", ..." if len(repeats) > 10 else "",
        )
        dropped = {r.line for r in repeats}
        rows = [r for r in rows if r.line not in dropped]
    return rows
