"""predict.py's output formats: CSV (spreadsheet-safe) and a plain-text table.

    sys.stdout.write(to_csv(predictions, topk=5))   # header, then one row an image
    print(to_table(predictions))

A cell that starts with = + - @ (or a tab or carriage return) is a formula to Excel, LibreOffice
and Google Sheets, and a file name can start that way: such a cell gets a leading apostrophe
(OWASP's advice against CSV injection), which the spreadsheet shows as text.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from predict import Prediction

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as a formula


def csv_header(topk: int) -> list[str]:
    columns = ["source", "predicted", "probability"]
    for i in range(1, topk + 1):
        columns += [f"class_{i}", f"probability_{i}"]
    return columns + ["error"]


def csv_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: one starting with = + - @ (or a tab or carriage
    return) gets a leading apostrophe, as OWASP's CSV-injection advice says; line breaks
    become "\n"."""
    text = "'" + text if text[:1] in FORMULA_STARTS else text
    # csv quotes a field with "\n" (the line terminator) but not one with a lone "\r", which
    # readers then take for the end of the row
    return text.replace("\r\n", "\n").replace("\r", "\n")


def to_csv(predictions: Iterable[Prediction], topk: int = 5, header: bool = True) -> str:
    """One row an image: the decision, then the top-k (class, probability), then any error;
    file names, classes and errors through csv_cell."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(csv_header(topk))
    for p in predictions:
        row = [csv_cell(p.source), csv_cell(p.predicted or "")]
        row.append("" if p.probability is None else f"{p.probability:.6f}")
        for i in range(topk):
            row += [csv_cell(p.topk[i][0]), f"{p.topk[i][1]:.6f}"] if i < len(p.topk) else ["", ""]
        writer.writerow(row + [csv_cell(p.error or "")])
    return out.getvalue()


def to_table(predictions: Iterable[Prediction]) -> str:
    rows = [("source", "prediction", "probability", "top-k")]
    for p in predictions:
        if p.error:
            rows.append((p.source, "ERROR", "", p.error))
        else:
            top = ", ".join(f"{c} {prob:.3f}" for c, prob in p.topk)
            rows.append((p.source, str(p.predicted), f"{p.probability:.4f}", top))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in rows
    )
