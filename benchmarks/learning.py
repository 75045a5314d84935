"""Accuracy versus minutes of training on real CIFAR-10 images, and what each recipe element adds.

    python benchmarks/learning.py                         # budgets 5 15 30 min, cifar10 preset
    python benchmarks/learning.py --minutes 5 --ablation  # the ablation, 5 minutes a row
    python benchmarks/learning.py --quick                 # seconds: checks that it works

Data: ../shared/data/cifar10-dev.tar.gz (10,000 CIFAR-10 training images, 1,000 a class, as
class folders) is extracted to a temporary folder; the project's own stratified split holds
out 15% for validation and 15% for testing, and the test accuracy (images never trained or
selected on) is what is reported. Every run is `source/train.py --max-minutes M` in a
subprocess, so the numbers include data loading and evaluation exactly as a user sees them.
Writes metadata/results/learning.md, learning.json and learning.png (learning-ablation.md and
.json with --ablation, loader.md with --loader), and each run's train.py log in
metadata/results/learning-logs/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAR = ROOT.parent / "shared" / "data" / "cifar10-dev.tar.gz"

# The ablation starts from the paper's ViT (patch tokens, class token, crop + flip only) and
# switches on one recipe element at a time, cumulatively: the cifar10 preset's elements up to
# TrivialAugment (that row is the preset), then the CCT elements the preset leaves out.
ABLATION = [
    ("ViT (paper: patch conv, class token)", ["--tokenizer", "patch", "--pool", "cls",
     "--augment", "none", "--ema-decay", "0", "--mixup-alpha", "0", "--cutmix-alpha", "0",
     "--drop-path-rate", "0", "--label-smoothing", "0"]),
    ("+ label smoothing 0.1", ["--label-smoothing", "0.1"]),
    ("+ conv tokenizer (CCT)", ["--tokenizer", "conv"]),
    ("+ TrivialAugment (= the cifar10 preset)", ["--augment", "trivialaugment"]),
    ("+ sequence pooling (not in the preset)", ["--pool", "seq"]),
    ("+ stochastic depth 0.1 (not in the preset)", ["--drop-path-rate", "0.1"]),
    ("+ EMA of weights 0.99 (not in the preset)", ["--ema-decay", "0.99"]),
]  # fmt: skip


def extract(tar_path: Path, into: Path) -> Path:
    if not tar_path.is_file():
        raise SystemExit(f"{tar_path} not found; pass --tar path/to/cifar10-dev.tar.gz")
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    folders = [p for p in into.iterdir() if p.is_dir()]
    return folders[0] if len(folders) == 1 else into


def run_train(args: list[str], work: Path, name: str, log_dir: Path | None = None) -> dict:
    """`source/train.py ARGS` in a subprocess, its outputs under work/name (and its printed
    log as log_dir/NAME.log); returns the saved model's test and validation accuracy, the
    epochs run and the wall-clock minutes."""
    model = work / name / "model.pth"
    cmd = [
        sys.executable, str(ROOT / "source" / "train.py"), *args,
        "--tracker", "none", "--run-name", name,
        "--model-path", str(model), "--results-dir", str(work / name / "results"),
        "--classes-path", str(work / name / "classes.txt"), "--runs-dir", str(work / "runs"),
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = (time.monotonic() - start) / 60
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{name}.log").write_text(proc.stdout)
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    epochs = sum(1 for line in proc.stdout.splitlines() if line.startswith("epoch "))
    return {
        "name": name,
        "model_path": str(model),
        "wall_minutes": round(wall, 2),
        "epochs": epochs,
        "test_accuracy": ckpt["metrics"]["test"]["accuracy"],
        "val_accuracy": ckpt["metrics"]["val"]["accuracy"],
    }


def train_once(
    data: Path, minutes: float, extra: list[str], work: Path, name: str, log_dir: Path
) -> dict:
    """The cifar10 preset on `data` for a budget of `minutes`; its log in log_dir."""
    args = ["--preset", "cifar10", "--data", str(data), "--max-minutes", str(minutes)]
    row = run_train([*args, "--epochs", "1000", *extra], work, name, log_dir)
    row.pop("model_path")  # a temporary folder
    return {"minutes": minutes, **row, "args": extra}


def loader_versus_step(data: Path, batches: int = 20, extra: list[str] | None = None) -> dict:
    """Images/s of the cifar10 preset's training loader alone (decode cache, augmentation
    in worker processes) and of its training step alone (forward, backward, AdamW) on
    the same batches: the loader must be the faster, or it starves the model."""
    sys.path.insert(0, str(ROOT / "source"))
    import preprocessing as P
    from config import PRESETS, Config, apply_overrides
    from runtime import set_torch_threads
    from transformer import build_model

    cfg = Config.from_dict({**PRESETS["cifar10"](), "data": str(data)})
    overrides = dict(zip((extra or [])[::2], (extra or [])[1::2], strict=True))
    apply_overrides(cfg, {k.lstrip("-"): v for k, v in overrides.items()})
    set_torch_threads(cfg.threads)
    splits = P.with_transforms(P.load_splits(cfg), cfg)
    loader = P.make_loader(splits.train, cfg, train=True)
    it = (batch for _ in range(10_000) for batch in loader)  # epoch after epoch
    next(it)  # workers started
    start, seen, kept = time.perf_counter(), 0, []
    for _ in range(batches):
        x, y = next(it)
        seen += len(y)
        kept.append((x, y))
    loader_rate = seen / (time.perf_counter() - start)
    model = build_model(cfg, len(splits.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    start = time.perf_counter()
    for x, y in kept:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step_rate = seen / (time.perf_counter() - start)
    return {"loader_images_per_s": loader_rate, "step_images_per_s": step_rate}


def ablation_runs(
    data: Path, minutes: float, extra: list[str], work: Path, log_dir: Path, quick: bool = False
) -> list[dict]:
    """The ABLATION steps, cumulatively, each a run of `minutes` (the first two if quick)."""
    rows, flags = [], []
    for label, step in ABLATION[: 2 if quick else None]:
        flags = flags + step
        row = train_once(data, minutes, extra + flags, work, f"ablation-{len(rows)}", log_dir)
        rows.append({"recipe": label, **row})
        print(f"{label}: {100 * row['test_accuracy']:.1f}%", flush=True)
    return rows


def write_ablation(rows: list[dict], out: Path) -> int:
    minutes = rows[0]["minutes"]
    lines = [f"Ablation at {minutes:g} minutes (cumulative, each row adds one element):", ""]
    lines += ["| recipe | test accuracy | change | epochs |", "| --- | ---: | ---: | ---: |"]
    previous = None
    for a in rows:
        acc = 100 * a["test_accuracy"]
        change = "" if previous is None else f"{acc - previous:+.1f}"
        lines.append(f"| {a['recipe']} | {acc:.1f}% | {change} | {a['epochs']} |")
        previous = acc
    text = "\n".join(lines) + "\n"
    (out / "learning-ablation.md").write_text(text)
    (out / "learning-ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["minutes"] for r in rows], [100 * r["test_accuracy"] for r in rows], marker="o")
    ax.set(xlabel="training budget (minutes, 2 CPU cores)", ylabel="test accuracy (%)")
    ax.set_title("cifar10 preset on 10k CIFAR-10 images")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tar", type=Path, default=DEFAULT_TAR, help="cifar10-dev.tar.gz")
    parser.add_argument("--data", type=Path, default=None, help="an extracted folder instead")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 15, 30])
    parser.add_argument(
        "--ablation", action="store_true", help="only the ablation, at the first budget"
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a test)")
    parser.add_argument(
        "--loader", action="store_true", help="only compare loader and step images/s"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "metadata" / "results")
    parser.add_argument(
        "--train-args", default="", help='extra train.py options, e.g. "--threads 1"'
    )
    args = parser.parse_args(argv)

    quick = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--limit-train-batches",
             "2", "--limit-eval-batches", "2", "--batch-size", "16", "--num-workers", "0",
             "--cache-images", "false"] if args.quick else []  # fmt: skip
    quick += args.train_args.split()
    minutes = [0.05] if args.quick else args.minutes
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "learning-logs"  # train.py's printed log of every run
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data or extract(args.tar, work / "data")
        if args.loader:
            rates = loader_versus_step(data, 3 if args.quick else 20, quick)
            text = (
                f"cifar10 preset, {rates['loader_images_per_s']:.0f} images/s from the loader "
                f"alone vs {rates['step_images_per_s']:.0f} images/s for the training step "
                f"alone ({rates['loader_images_per_s'] / rates['step_images_per_s']:.1f}x)"
            )
            (args.out / "loader.md").write_text(text + "\n")
            print(text)
            return 0
        if args.ablation:
            rows = ablation_runs(data, minutes[0], quick, work, logs, args.quick)
            return write_ablation(rows, args.out)
        rows = [train_once(data, m, quick, work, f"budget-{m:g}", logs) for m in minutes]
    lines = [
        "| budget (min) | test accuracy | val accuracy | epochs | wall (min) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['minutes']:g} | {100 * r['test_accuracy']:.1f}% | {100 * r['val_accuracy']:.1f}% "
        f"| {r['epochs']} | {r['wall_minutes']:.1f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    (args.out / "learning.md").write_text(table + "\n")
    (args.out / "learning.json").write_text(json.dumps({"budgets": rows}, indent=2) + "\n")
    plot(rows, args.out / "learning.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
