"""Accuracy versus minutes of training on real CIFAR-10 images, and what each recipe element adds.

    python benchmarks/learning.py                         # budgets 15 30 60 min, cifar10 preset
    python benchmarks/learning.py --minutes 15 30 --slow-minutes 15   # + a --threads 1 row
    python benchmarks/learning.py --tar ../shared/data/cifar10-train.tar.gz --minutes 30 60
    python benchmarks/learning.py --minutes 5 --ablation  # the ablation, 5 minutes a row
    python benchmarks/learning.py --throughput            # only the step's share of matmul rate
    python benchmarks/learning.py --quick                 # seconds: checks that it works

Data: ../shared/data/cifar10-dev.tar.gz (10,000 CIFAR-10 training images, 1,000 a class, as
class folders), or cifar10-train.tar.gz (the whole 50,000-image training split), or --data an
extracted folder; a tar is extracted to a temporary folder. The project's own stratified
split holds out 15% for validation and 15% for testing, and the test accuracy (images never
trained or selected on) is what is reported. To hold out less (of the 50,000: 42,500 to
train on, 5,000 to test), add --train-args "--val-fraction 0.05 --test-fraction 0.1". Every
run is `source/train.py --max-minutes M` in a subprocess, so the numbers include data loading
and evaluation exactly as a user sees them (--quick forks them from a server that imported
torch once: see run_train); --slow-minutes runs budgets again with --threads 1, a machine half
as fast.

Before the runs, the training step's throughput is measured in this process (the preset's
loader with its workers, augmentation and decode cache, and the training step as train.py
runs it) and reported as a fraction of the machine's fp32 matmul rate (torch.mm GFLOP/s,
measured at the start of the same run, same threads); the step's FLOPs are counted with
torch.utils.flop_counter at the preset's shape.
Writes metadata/results/learning.md, learning.json and learning.png (learning-ablation.md and
.json with --ablation, loader.md with --loader, throughput.md with --throughput), and each
run's train.py log in metadata/results/learning-logs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
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


def in_turn(calls: list, side_by_side: bool = False) -> list:
    """The results of `calls` (functions of no argument), run one after the other, or side
    by side in threads (each a train.py subprocess): --quick does that, for a test's wall
    time on two cores; a measured run does not, so that no two timed runs share the CPU."""
    if not side_by_side:
        return [call() for call in calls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        return list(pool.map(lambda call: call(), calls))


def extract(tar_path: Path, into: Path) -> Path:
    if not tar_path.is_file():
        raise SystemExit(f"{tar_path} not found; pass --tar path/to/cifar10-dev.tar.gz")
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    folders = [p for p in into.iterdir() if p.is_dir()]
    return folders[0] if len(folders) == 1 else into


def run_train(
    args: list[str], work: Path, name: str, log_dir: Path | None = None, forked: bool = False
) -> dict:
    """`source/train.py ARGS` in a subprocess, its outputs under work/name (and its printed
    log as log_dir/NAME.log); returns the saved model's test and validation accuracy, the
    epochs run and the wall-clock minutes. `forked` (--quick) runs train.main(ARGS) in a
    process forked from train_server() instead: still a process of its own (threads, RNG,
    exit code), without the 9-12 CPU-seconds of importing torch, torchvision and sklearn
    that each `python` start costs. Measured runs do not, so their wall-clock minutes
    include the interpreter's start, as a user's run does."""
    model = work / name / "model.pth"
    argv = [
        *args, "--tracker", "none", "--run-name", name,
        "--model-path", str(model), "--results-dir", str(work / name / "results"),
        "--classes-path", str(work / name / "classes.txt"), "--runs-dir", str(work / "runs"),
    ]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "source" / "train.py"), *argv]
    stdout, stderr = work / name / "stdout.log", work / name / "stderr.log"
    stdout.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with stdout.open("w") as out, stderr.open("w") as err:
        if forked:
            child = train_server().Process(target=train_main, args=(argv, stdout, stderr))
            child.start()
            child.join()
            returncode = child.exitcode
        else:
            returncode = subprocess.run(cmd, stdout=out, stderr=err).returncode
    wall = (time.monotonic() - start) / 60
    if returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{stderr.read_text()[-2000:]}")
    log = stdout.read_text()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{name}.log").write_text(log)
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    epochs = sum(1 for line in log.splitlines() if line.startswith("epoch "))
    return {
        "name": name,
        "model_path": str(model),
        "wall_minutes": round(wall, 2),
        "epochs": epochs,
        "test_accuracy": ckpt["metrics"]["test"]["accuracy"],
        "val_accuracy": ckpt["metrics"]["val"]["accuracy"],
    }


@functools.cache
def train_server() -> multiprocessing.context.BaseContext:
    """A 'forkserver' context: one server process, started at the first run, imports
    train.py's heavy libraries (and runs no torch op, so no thread pool exists yet) and
    forks a child per run. Its only threads then are OpenBLAS's and jemalloc's, which handle
    fork, as train.py's forked loader workers already need. By name from site-packages:
    Python 3.11's server ignores sys.path, so it cannot preload train itself; each child
    imports the project's modules, quickly."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchvision", "sklearn.metrics"])
    return context


def train_main(argv: list[str], stdout: Path, stderr: Path) -> None:
    """train.py's main(argv) in a forked child, its printed output to the two files."""
    with stdout.open("a") as out, stderr.open("a") as err:
        os.dup2(out.fileno(), 1)  # file descriptors: torch's and the loader's output too
        os.dup2(err.fileno(), 2)
    sys.path.insert(0, str(ROOT / "source"))
    import train

    sys.exit(train.main(argv))  # the exit code; multiprocessing flushes stdout and stderr


def train_once(
    data: Path,
    minutes: float,
    extra: list[str],
    work: Path,
    name: str,
    log_dir: Path,
    forked: bool = False,
) -> dict:
    """The cifar10 preset on `data` for a budget of `minutes`; its log in log_dir."""
    args = ["--preset", "cifar10", "--data", str(data), "--max-minutes", str(minutes)]
    row = run_train([*args, "--epochs", "1000", *extra], work, name, log_dir, forked)
    row.pop("model_path")  # a temporary folder
    threads = dict(zip(extra[::2], extra[1::2], strict=False)).get("--threads", "preset")
    return {"minutes": minutes, "threads": threads, **row, "args": extra}


def preset_config(data: Path, extra: list[str] | None):
    """The cifar10 preset's Config on `data` with `extra` train.py options over it."""
    sys.path.insert(0, str(ROOT / "source"))
    from config import PRESETS, Config, apply_overrides

    cfg = Config.from_dict({**PRESETS["cifar10"](), "data": str(data)})
    overrides = dict(zip((extra or [])[::2], (extra or [])[1::2], strict=True))
    return apply_overrides(cfg, {k.lstrip("-"): v for k, v in overrides.items()})


def matmul_gflops(n: int = 1024, seconds: float = 0.3, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate with torch's current threads: GFLOP/s of torch.mm on
    n x n matrices, the best of `repeats` timings of `seconds` each."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def train_flops_per_image(cfg, num_classes: int, batch: int = 8) -> float:
    """Forward + backward FLOPs of one image at cfg's shape. Counted on the explicit
    attention path: FlopCounterMode does not see the fused CPU kernel, which computes the
    same products."""
    from torch.utils.flop_counter import FlopCounterMode

    from transformer import build_model

    model = build_model(dataclasses.replace(cfg, fused_attn=False), num_classes)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long)).backward()
    return counter.get_total_flops() / batch


def step_throughput(data: Path, seconds: float = 60.0, extra: list[str] | None = None) -> dict:
    """Images/s of training as train.py runs it (the preset's loader: workers, decode cache,
    augmentation; then the step: forward, backward, clipping, fused AdamW) over `seconds`
    after a warm-up, and its FLOP rate as a fraction of the matmul rate measured first."""
    cfg = preset_config(data, extra)
    import preprocessing as P
    import training as T
    from finetune import param_groups_layer_decay
    from runtime import default_threads, set_torch_threads
    from transformer import build_model

    set_torch_threads(default_threads())  # the machine's rate: every core it may use
    matmul = matmul_gflops()
    threads = set_torch_threads(cfg.threads)
    splits = P.with_transforms(P.load_splits(cfg), cfg)
    splits.train.seed = cfg.seed
    num_classes = len(splits.classes)
    per_image = train_flops_per_image(cfg, num_classes)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes)
    sampler = T.EpochSampler(len(splits.train), cfg.seed)
    groups = param_groups_layer_decay(model, cfg.weight_decay, 1.0)
    loop = T.Loop(cfg=cfg, model=model, sampler=sampler, device=torch.device("cpu"),
                  optimizer=T.make_optimizer(groups, cfg, torch.device("cpu")),
                  objective=T.Objective(model, cfg), steps_per_epoch=len(sampler),
                  loader=P.make_loader(splits.train, cfg, train=True, sampler=sampler),
                  mixer=T.make_batch_mixer(cfg, num_classes))  # fmt: skip
    model.train()
    batches = (batch for epoch in range(10_000) for batch in epoch_batches(loop, epoch))
    for _ in range(3):  # warm-up: workers started, first allocations done
        T.train_step(loop, *next(batches), cfg.lr)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or images == 0:
        images += T.train_step(loop, *next(batches), cfg.lr)[2]
    rate = images / (time.perf_counter() - start)
    achieved = rate * per_image / 1e9
    return {
        "threads": threads,
        "num_workers": P.loader_workers(cfg.num_workers),
        "matmul_gflops": matmul,
        "train_mflop_per_image": per_image / 1e6,
        "images_per_s": rate,
        "train_gflops": achieved,
        "fraction_of_matmul": achieved / matmul,
    }


def epoch_batches(loop, epoch: int):
    loop.sampler.set_epoch(epoch)
    yield from loop.loader


def throughput_line(t: dict) -> str:
    return (
        f"training step at {t['images_per_s']:.0f} images/s x {t['train_mflop_per_image']:.0f} "
        f"MFLOP = {t['train_gflops']:.1f} GFLOP/s, {100 * t['fraction_of_matmul']:.0f}% of the "
        f"machine's fp32 matmul rate ({t['matmul_gflops']:.1f} GFLOP/s; training on "
        f"{t['threads']} thread(s), "
        f"{t['num_workers']} loader worker(s))"
    )


def loader_versus_step(data: Path, batches: int = 20, extra: list[str] | None = None) -> dict:
    """Images/s of the cifar10 preset's training loader alone (decode cache, augmentation
    in worker processes) and of its training step alone (forward, backward, AdamW) on
    the same batches: the loader must be the faster, or it starves the model."""
    cfg = preset_config(data, extra)
    import preprocessing as P
    from runtime import set_torch_threads
    from transformer import build_model

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
    """The ABLATION steps, cumulatively, each a run of `minutes` (the first two if quick,
    side by side)."""

    def run(i: int, label: str, flags: list[str]) -> dict:
        row = train_once(data, minutes, extra + flags, work, f"ablation-{i}", log_dir, quick)
        print(f"{label}: {100 * row['test_accuracy']:.1f}%", flush=True)
        return {"recipe": label, **row}

    calls, flags = [], []
    for label, step in ABLATION[: 2 if quick else None]:
        flags = flags + step
        calls.append(functools.partial(run, len(calls), label, flags))
    return in_turn(calls, quick)


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


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for threads in sorted({str(r["threads"]) for r in rows}):
        mine = sorted((r for r in rows if str(r["threads"]) == threads), key=lambda r: r["minutes"])
        label = "the preset's threads" if threads == "preset" else f"--threads {threads}"
        ax.plot([r["minutes"] for r in mine], [100 * r["test_accuracy"] for r in mine],
                marker="o", label=label)  # fmt: skip
    ax.set(xlabel="training budget (minutes)", ylabel="test accuracy (%)")
    ax.legend()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tar", type=Path, default=DEFAULT_TAR,
                        help="cifar10-dev.tar.gz or cifar10-train.tar.gz")  # fmt: skip
    parser.add_argument("--data", type=Path, default=None, help="an extracted folder instead")
    parser.add_argument("--minutes", type=float, nargs="+", default=[15, 30, 60])
    parser.add_argument("--slow-minutes", type=float, nargs="*", default=[],
                        help="budgets to run again with --threads 1 (half the machine)")  # fmt: skip
    parser.add_argument(
        "--ablation", action="store_true", help="only the ablation, at the first budget"
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a test)")
    parser.add_argument(
        "--loader", action="store_true", help="only compare loader and step images/s"
    )
    parser.add_argument("--throughput", action="store_true",
                        help="only the training step's share of the matmul rate")  # fmt: skip
    parser.add_argument("--throughput-seconds", type=float, default=60.0,
                        help="how long the throughput is measured before the runs")  # fmt: skip
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
    seconds = 1.0 if args.quick else args.throughput_seconds
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
        speed = step_throughput(data, seconds, quick)
        print(throughput_line(speed), flush=True)
        if args.throughput:
            (args.out / "throughput.md").write_text(throughput_line(speed) + "\n")
            (args.out / "throughput.json").write_text(json.dumps(speed, indent=2) + "\n")
            return 0
        images = sum(1 for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        runs = [(m, quick, f"budget-{m:g}") for m in minutes]
        runs += [
            (m, [*quick, "--threads", "1"], f"budget-{m:g}-threads1") for m in args.slow_minutes
        ]
        calls = [
            functools.partial(train_once, data, m, x, work, n, logs, args.quick) for m, x, n in runs
        ]
        rows = in_turn(calls, args.quick)
    write_budgets(rows, speed, images, args.out)
    return 0


def write_budgets(rows: list[dict], speed: dict, images: int, out: Path) -> None:
    lines = [
        f"{images} images; {throughput_line(speed)}",
        "",
        "| budget (min) | test accuracy | val accuracy | epochs | wall (min) | threads |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['minutes']:g} | {100 * r['test_accuracy']:.1f}% | {100 * r['val_accuracy']:.1f}% "
        f"| {r['epochs']} | {r['wall_minutes']:.1f} | {r['threads']} |"
        for r in rows
    ]
    table = "\n".join(lines)
    (out / "learning.md").write_text(table + "\n")
    result = {"images": images, "throughput": speed, "budgets": rows}
    (out / "learning.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "learning.png", f"cifar10 preset on {images:,} CIFAR-10 images")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
