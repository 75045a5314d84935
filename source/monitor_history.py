"""The monitoring history: one JSON line per monitor.py check (time, data, images, accuracy,
f1_macro, roc_auc, drift statistics, verdict) in history.jsonl beside its reports, the trend
drawn from all of them (report.plot_monitor_history), and each check logged to a tracker.

    records = append_history(Path("metadata/results/monitor"), history_record(report, baseline))
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from pathlib import Path

import metrics as M
import report as report_files
import tracking

HISTORY_FILE, HISTORY_PLOT = "history.jsonl", "history.png"


def history_record(report: dict, baseline: dict | None) -> dict:
    """One line of history.jsonl: when, on what, the metrics (None without labels), the
    drift statistics and the verdict."""
    rows = (report["decay"] or {}).get("metrics", {})
    drift = report["drift"]
    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "data": report["data"],
        "model_path": report["model_path"],
        "mode": report["mode"],
        "num_images": report["num_images"],
        **{name: rows[name]["new"] if name in rows else None for name in M.DECAY_METRICS},
        "baseline": baseline,
        "drift": {
            name: {k: t[k] for k in ("statistic", "p_value", "drifted")}
            for name, t in drift["tests"].items()
        },
        "psi": {name: r["value"] for name, r in drift["psi"].items()},
        "decay_detected": bool(report["decay"] and report["decay"]["detected"]),
        "drift_detected": bool(drift["detected"]),
        "status": report["status"],
        "exit_code": report["exit_code"],
        "reasons": report["reasons"],
    }


def read_history(path: Path) -> list[dict]:
    """Every check in history.jsonl, oldest first; a line that does not parse (a write cut
    short) is skipped with a note rather than losing the history."""
    records = []
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            print(f"note: {path}:{number} is not a JSON line; skipped", file=sys.stderr)
    return records


def append_history(out: Path, record: dict) -> list[dict]:
    """Append the check to out/history.jsonl and redraw out/history.png from every check;
    returns the history, this check last."""
    path = out / HISTORY_FILE
    line = json.dumps(M.json_safe(record), allow_nan=False)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    records = read_history(path)
    report_files.plot_monitor_history(records, out / HISTORY_PLOT, record["baseline"])
    return records


def log_check(args, record: dict, step: int, files) -> str:
    """The check's numbers at step `step` (its place in the history), tags and `files`, into
    a new run of args.tracker or the run args.run_id names (test.py's options)."""
    run = tracking.open_run(
        args.tracker, run_id=args.run_id, run_name=args.run_name, runs_dir=args.runs_dir
    )
    try:
        run.set_tags({"monitor/data": record["data"], "monitor/status": record["status"]})
        numbers = {f"monitor/{k}": record[k] for k in (*M.DECAY_METRICS, "num_images")}
        numbers.update({f"monitor/{k}_p": t["p_value"] for k, t in record["drift"].items()})
        numbers.update({f"monitor/psi_{k}": v for k, v in record["psi"].items()})
        numbers["monitor/retrain"] = float(record["status"] == "retrain")
        finite = {
            k: float(v)
            for k, v in numbers.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        }
        run.log_metrics(finite, step=step)
        for path in files:
            run.log_artifact(path)
    finally:
        run.finish()
    return run.run_id
