"""Do distillation and fine-tuning help? Two measured comparisons on the embedded digits.

    python benchmarks/transfer.py            # both comparisons, 3 seeds each (~40 min, 1 core)
    python benchmarks/transfer.py --only distillation --teacher t.pth --modes hard \\
        --student-args "--augment trivialaugment"        # reuse a teacher, another recipe
    python benchmarks/transfer.py --quick    # seconds: checks that it works

1. DeiT distillation (Touvron et al. 2021). A ResNet-18 teacher is trained by this pipeline
   (`--arch resnet18`) on digits at 32 px; then the same tiny ViT student (the paper's ViT:
   one patch convolution, class token) is trained without a teacher and with `--teacher`
   (hard and soft distillation, distillation token), for the same epochs, 3 seeds each.
2. Fine-tuning (the pipeline of `--pretrained`, on weights from a locally trained model: no
   downloads here). A ViT is trained on the digits 0-5; then the digits 6-9 are learnt from 10
   training images a class, from scratch and from those weights (a new 4-class head), 3
   seeds each.

The digits are written once as an ImageFolder tree with fixed train/valid/test folders, so
every seed and every model is scored on the same held-out images, which no teacher or
pretrained model ever saw. Every run is `source/train.py` in a subprocess
(learning.run_train; with --quick, forked from a server that imported torch once).
Writes metadata/results/transfer.md and transfer.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from learning import ROOT, in_turn, run_train

sys.path.insert(0, str(ROOT / "source"))
from preprocessing import stratified_split  # noqa: E402

SEEDS = (0, 1, 2)
# The student of both comparisons: the paper's ViT, tiny (0.2 M parameters), at 32 px.
STUDENT = ["--preset", "digits", "--image-size", "32", "--patch-size", "4", "--tokenizer",
           "patch", "--pool", "cls", "--embed-dim", "64", "--depth", "4", "--num-heads", "2",
           "--mlp-ratio", "2", "--ema-decay", "0", "--max-minutes", "0", "--threads", "1"]  # fmt: skip
TEACHER = ["--preset", "digits", "--image-size", "32", "--arch", "resnet18", "--lr", "1e-3",
           "--ema-decay", "0", "--max-minutes", "0", "--threads", "1"]  # fmt: skip


def write_digits(root: Path, seed: int = 0) -> Path:
    """sklearn's digits as root/{train,valid,test}/<digit>/NNNN.png (8x8 grayscale; the
    loader resizes), split 70/15/15 per class with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    parts = stratified_split(digits.target, [0.15, 0.15], seed)
    for split, indices in zip(("train", "valid", "test"), parts, strict=True):
        for i in indices:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(folder / f"{i:04d}.png")
    return root


def subset(src: Path, dst: Path, classes: list[str], train_per_class: int | None) -> Path:
    """A copy of src with only `classes`, and at most train_per_class training images each
    (the first ones by name; valid and test are kept whole)."""
    for split in ("train", "valid", "test"):
        for c in classes:
            files = sorted((src / split / c).iterdir())
            if split == "train" and train_per_class is not None:
                files = files[:train_per_class]
            (dst / split / c).mkdir(parents=True, exist_ok=True)
            for f in files:
                (dst / split / c / f.name).write_bytes(f.read_bytes())
    return dst


def summary(runs: list[dict]) -> dict:
    accs = [100 * r["test_accuracy"] for r in runs]
    return {
        "mean": statistics.mean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "per_seed": accs,
        "epochs": runs[0]["epochs"],
        "minutes_per_run": statistics.mean(r["wall_minutes"] for r in runs),
    }


def compare(
    rows: dict, work: Path, data: Path, seeds, base: list[str], variants: dict, forked: bool
) -> dict:
    """rows[label] = summary over seeds of train.py BASE + variant args, for each variant."""
    for label, extra in variants.items():
        runs = [
            run_train(
                [*base, "--data", str(data), "--seed", str(s), *extra],
                work,
                f"{label}-{s}",
                forked=forked,
            )
            for s in seeds
        ]
        rows[label] = summary(runs)
        print(f"{label}: {rows[label]['mean']:.2f}% (seeds {rows[label]['per_seed']})")
    return rows


def table(rows: dict, baseline: str) -> list[str]:
    lines = [
        "| model | test accuracy, mean ± std | per seed | gap vs first row | epochs | min a run |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows.items():
        seeds = " / ".join(f"{a:.1f}" for a in r["per_seed"])
        gap = r["mean"] - rows[baseline]["mean"]
        lines.append(
            f"| {label} | {r['mean']:.2f}% ± {r['std']:.2f} | {seeds} | {gap:+.2f} points "
            f"| {r['epochs']} | {r['minutes_per_run']:.1f} |"
        )
    return lines


def distillation(args, work: Path, data: Path, seeds, quick: list[str]) -> tuple[list, dict]:
    if args.teacher:
        teacher = {"model_path": str(args.teacher), "epochs": "?", "wall_minutes": 0.0}
        teacher |= score_checkpoint(args.teacher)
    else:
        epochs = ["--epochs", str(1 if args.quick else args.teacher_epochs)]
        teacher = run_train(
            [*TEACHER, "--data", str(data), *epochs, *quick], work, "teacher", forked=args.quick
        )
    print(f"teacher (resnet18): {100 * teacher['test_accuracy']:.2f}%")
    epochs = 1 if args.quick else args.epochs
    student = [*STUDENT, "--epochs", str(epochs), *quick, *args.student_args.split()]
    variants = {"ViT student, no teacher": []}
    for mode in args.modes:
        variants[f"ViT student, {mode} distillation"] = [
            "--teacher", teacher["model_path"], "--distill", mode,
        ]  # fmt: skip
    rows = compare({}, work, data, seeds, student, variants, args.quick)
    t = summary([teacher])
    extra = f" (plus `{args.student_args}`)" if args.student_args else ""
    lines = [
        f"## Distillation: digits at 32 px, {len(seeds)} seeds, {epochs} epochs a student",
        "",
        f"Teacher: ResNet-18 trained by this pipeline (`--arch resnet18`, {teacher['epochs']} "
        f"epochs): {t['mean']:.2f}% test accuracy. Student: the paper's ViT (patch 4, class "
        f"token), width 64, depth 4, 2 heads{extra}.",
        "",
        *table(rows, "ViT student, no teacher"),
    ]
    return lines, {"teacher": t, "student_args": args.student_args, "rows": rows}


def score_checkpoint(path: Path) -> dict:
    """The test accuracy a checkpoint of train.py recorded."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {"test_accuracy": ckpt["metrics"]["test"]["accuracy"]}


def fine_tuning(args, work: Path, data: Path, seeds, quick: list[str]) -> tuple[list, dict]:
    old, new = [str(d) for d in range(6)], [str(d) for d in range(6, 10)]
    source_data = subset(data, work / "digits-0-5", old, None)
    target_data = subset(data, work / "digits-6-9", new, args.shots)
    n_test = sum(1 for _ in (target_data / "test").rglob("*.png"))
    epochs = ["--epochs", str(1 if args.quick else args.epochs)]
    pretrained = run_train(
        [*STUDENT, *epochs, *quick, "--data", str(source_data)],
        work,
        "pretrain-0-5",
        forked=args.quick,
    )
    print(f"pretrained on 0-5: {100 * pretrained['test_accuracy']:.2f}%")
    finetune = [*STUDENT, "--epochs", str(1 if args.quick else args.finetune_epochs)]
    finetune += ["--batch-size", "16", *quick]
    weights = ["--pretrained", pretrained["model_path"]]
    rows = compare(
        {},
        work,
        target_data,
        seeds,
        finetune,
        {
            "from scratch": [],
            "fine-tuned from the 0-5 model": weights,
            "fine-tuned, head only for 5 epochs, layer decay 0.75": weights
            + ["--freeze-epochs", "5", "--layer-decay", "0.75"],
        },
        args.quick,
    )
    lines = [
        f"## Fine-tuning: digits 6-9 from {args.shots} training images a class",
        "",
        "Pretrained: the same ViT trained on the digits 0-5 "
        f"({100 * pretrained['test_accuracy']:.2f}% on their test images); scored on the "
        f"{n_test} held-out test images of 6-9.",
        "",
        *table(rows, "from scratch"),
    ]
    return lines, {"pretrained_source_accuracy": 100 * pretrained["test_accuracy"], "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("distillation", "fine-tuning"), default=None)
    parser.add_argument("--epochs", type=int, default=40, help="epochs of every student run")
    parser.add_argument("--student-args", default="", help="extra train.py options (students)")
    parser.add_argument("--teacher", type=Path, default=None, help="reuse this teacher")
    parser.add_argument("--modes", nargs="+", choices=("hard", "soft"), default=["hard", "soft"])
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=60)
    parser.add_argument("--shots", type=int, default=10, help="training images a new class")
    parser.add_argument("--quick", action="store_true", help="tiny runs (a test)")
    parser.add_argument("--out", type=Path, default=ROOT / "metadata" / "results")
    args = parser.parse_args(argv)

    seeds = SEEDS[:1] if args.quick else SEEDS
    quick = ["--limit-train-batches", "2", "--limit-eval-batches", "2"] if args.quick else []
    command = " ".join(["python benchmarks/transfer.py", *(argv or sys.argv[1:])])
    lines, result = ["# Transfer learning and distillation", "", f"`{command}`"], {}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_digits(work / "digits")
        parts = {"distillation": distillation, "fine-tuning": fine_tuning}
        chosen = [name for name in parts if args.only in (None, name)]
        calls = [functools.partial(parts[n], args, work, data, seeds, quick) for n in chosen]
        for name, (text, part) in zip(chosen, in_turn(calls, args.quick), strict=True):
            lines += ["", *text]
            result[name] = part
    text = "\n".join(lines) + "\n"
    (args.out / "transfer.md").write_text(text)
    (args.out / "transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
