"""Export a checkpoint to ONNX, check it against PyTorch on real images, quantize it to int8.

    python source/export.py                              # metadata/models/model.onnx
    python source/export.py --quantize int8              # and metadata/models/model.int8.onnx
    python source/export.py --model-path m.pth --out m.onnx --data path/to/images
    python source/export.py --format torchscript         # metadata/models/model.pt

The ONNX file is self-contained (weights inside, no external data file), takes a batch of any
size, (B, 3, S, S) float32 normalised images named `images`, and returns `logits`. The class
names, the preprocessing (image size, mean, std) and the config travel in its
metadata_props; `<out>.json` beside it repeats them with the verification report.

Verification runs PyTorch and ONNX Runtime on the test split of the checkpoint's data (or
--data) with the checkpoint's eval transform: the largest absolute logit difference, top-1
agreement and accuracy of each. A file that fails its check is deleted and the exit status is
1: the fp32 file when it disagrees beyond --atol / --min-agreement (and the int8 file made from
it), the int8 file alone when it loses more than --max-int8-drop accuracy points (the fp32
file passed, so it stays). A checkpoint or data that cannot be read gives 2.

The graph stays in standard ONNX operators (portable, opset 23): one Attention node a block,
fed the (B, S, C) projections directly (`onnx_graph.fold_head_reshapes`), and one Gelu node,
which ONNX Runtime fuses with its bias Add when it loads the file. `--graph-optimizer
transformers` bakes in `onnxruntime.transformers.optimizer`'s fusions instead (ONNX Runtime
only), which add nothing to this graph: its shape inference does not know opset 23's
Attention, so it skips its SkipLayerNormalization fusion (docs/benchmarks/speed.md).
int8 (`source/quantize.py`) is dynamic quantization of every MatMul weight, 7-bit so that CPUs
without VNNI do not saturate, activations quantized per batch at run time; a CCT conv
tokenizer is quantized statically (uint8 activations whose ranges come from 256 training
images), so it runs in int8 too. Other modules run the files with `onnx_io.OnnxRunner`.

`--format torchscript` traces the model (torch.jit.trace) into a .pt file that
`torch.jit.load` reads without source/; the checkpoint's class names, preprocessing, threshold,
config, metrics and provenance travel in its extra file vit_pipeline.json. It is verified the
same way (--atol, --min-agreement) and served by `Predictor` (backend torchscript, or a .pt
MODEL_PATH): the choice where the serving side has torch anyway (a C++ or TorchServe runtime,
a GPU with torch's kernels); ONNX is the choice for serving without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
from pathlib import Path

import numpy as np

import quantize as Q
from cli import HelpFormatter, default_model_path
from onnx_graph import fold_head_reshapes
from onnx_io import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxError,
    OnnxRunner,
    metadata_for,
    quiet_logging,
    set_metadata,
    write_onnx,
)

# Opset 23: attention is one Attention node a block (fold_head_reshapes), and GELU one Gelu
# node (opset 20), which ONNX Runtime fuses with its bias Add into BiasGelu; opset 18's
# Div-Erf-Add-Mul-Mul decomposition matched none of its GELU patterns.
OPSET = 23


def export_model(model, image_size: int, out: Path, props: dict[str, str]) -> Path:
    """torch.export-based ONNX export with a dynamic batch axis, metadata attached."""
    import torch

    from attention import Attention

    model = copy.deepcopy(model).cpu().eval()
    # The fused path (scaled_dot_product_attention) exports to one Attention node a block.
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = True
    example = torch.zeros(2, 3, image_size, image_size)  # 2: a batch of 1 could be specialised
    batch = torch.export.Dim("batch", min=1, max=65536)
    log = io.StringIO()
    try:
        # The exporter prints its progress; keep it for the error message only.
        with contextlib.redirect_stdout(log), quiet_logging(), torch.no_grad():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                optimize=True,
            )
    except Exception as err:
        raise OnnxError(
            f"the ONNX export failed ({str(err).splitlines()[0][:300]}); exporter log:\n"
            + log.getvalue()[-2000:]
        ) from None
    proto = program.model_proto
    attention = sum(node.op_type == "Attention" for node in proto.graph.node)
    if fold_head_reshapes(proto.graph) < attention:  # slower, not wrong: still worth a word
        print(
            "warning: some Attention nodes kept their 4-D inputs (an exporter version this "
            "export does not know); the model is correct, ONNX Runtime runs it slower",
            file=sys.stderr,
        )
    # Shapes recorded by the exporter confuse the quantizer's shape inference (it re-infers
    # them and finds conflicts); ONNX Runtime infers them again at load anyway.
    proto.graph.ClearField("value_info")
    proto.doc_string = "Vision Transformer exported by source/export.py"
    set_metadata(proto, props)
    write_onnx(proto, out)
    return out


def optimize_transformers(fp32_path: Path, out: Path, cfg: dict, props: dict[str, str]):
    """onnxruntime.transformers.optimizer (model_type vit) on an exported file; returns the
    path and the fusions it made. The result may use ONNX Runtime's contrib operators, so it
    runs on ONNX Runtime only. On this project's opset 23 graph it adds nothing that ONNX
    Runtime does not fuse at load (its shape inference does not know Attention)."""
    from onnxruntime.transformers import optimizer

    if cfg.get("arch", "vit") != "vit":
        raise OnnxError("the transformers graph optimizer applies to ViT checkpoints only")
    with quiet_logging():
        optimized = optimizer.optimize_model(
            str(fp32_path),
            model_type="vit",
            num_heads=int(cfg["num_heads"]),
            hidden_size=int(cfg["embed_dim"]),
        )
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    proto = optimized.model
    set_metadata(proto, {**props, "graph_optimizer": f"onnxruntime.transformers vit {fused}"})
    write_onnx(proto, out)
    return out, fused


# ---- verification ---------------------------------------------------------------------------


def load_data(ckpt: dict, data: str | None):
    """(splits, config) of the checkpoint's data (or `data`), the eval transform on the train
    and test splits; raises preprocessing.DataError when they cannot be used."""
    import preprocessing as P
    from checkpoint import config_from_checkpoint

    cfg = config_from_checkpoint(ckpt)
    if data:
        cfg.data = data
    cfg.batch_size, cfg.num_workers = 64, 0
    splits = P.load_splits_for_model(cfg, ckpt["classes"])
    if len(splits.test) == 0:
        raise P.DataError(f"the test split of {cfg.data} is empty; pass --data with test images")
    prep = ckpt["preprocessing"]
    splits.train.transform = splits.test.transform = P.eval_transform(
        prep["image_size"], prep["mean"], prep["std"]
    )
    return splits, cfg


def test_images(splits, cfg, max_images: int):
    """A loader over the test split of `load_data`'s (splits, config), at most `max_images`
    images (0 = all), and the data's name."""
    import torch

    import preprocessing as P

    dataset = splits.test
    if max_images and len(dataset) > max_images:
        dataset = torch.utils.data.Subset(dataset, range(max_images))
    return P.make_loader(dataset, cfg, train=False), str(cfg.data)


def compare(model, runners: dict[str, OnnxRunner], loader) -> dict[str, dict]:
    """PyTorch and each runner on the same batches: accuracy, top-1 agreement with PyTorch,
    largest absolute logit difference."""
    import torch

    logits = {"pytorch": [], **{name: [] for name in runners}}
    labels = []
    with torch.inference_mode():
        for x, y in loader:
            logits["pytorch"].append(model(x).float().numpy())
            for name, runner in runners.items():
                logits[name].append(runner.logits(x.numpy()))
            labels.append(y.numpy())
    y = np.concatenate(labels)
    ref = np.concatenate(logits["pytorch"])
    report = {}
    for name, chunks in logits.items():
        out = np.concatenate(chunks)
        report[name] = {
            "images": int(len(y)),
            "accuracy": float((out.argmax(1) == y).mean()),
            "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(out - ref).max()),
        }
    return report


def check(
    report: dict, atol: float, min_agreement: float, max_int8_drop: float
) -> dict[str, list[str]]:
    """The reasons each file is rejected: {"onnx": [...], "int8": [...]} (empty lists pass)."""
    problems: dict[str, list[str]] = {"onnx": []}
    fp32 = report["onnx"]
    if fp32["max_abs_diff"] > atol:
        problems["onnx"].append(
            f"ONNX logits differ from PyTorch by up to {fp32['max_abs_diff']:.3g} (> --atol {atol})"
        )
    if fp32["top1_agreement"] < min_agreement:
        problems["onnx"].append(
            f"ONNX top-1 agrees with PyTorch on {fp32['top1_agreement']:.2%} of the images "
            f"(< --min-agreement {min_agreement:.2%})"
        )
    if "int8" in report:
        problems["int8"] = []
        drop = 100 * (report["pytorch"]["accuracy"] - report["int8"]["accuracy"])
        if drop > max_int8_drop:
            problems["int8"].append(
                f"int8 loses {drop:.2f} accuracy points (> --max-int8-drop {max_int8_drop})"
            )
    return problems


def format_report(report: dict, sizes: dict[str, int]) -> str:
    lines = [
        f"{'model':8s} {'size MB':>8s} {'accuracy':>9s} {'top-1 agree':>12s} {'max |dlogit|':>13s}",
    ]
    for name, r in report.items():
        size = f"{sizes[name] / 1e6:8.2f}" if name in sizes else f"{'':8s}"
        lines.append(
            f"{name:8s} {size} {r['accuracy']:9.4f} {r['top1_agreement']:12.4f} "
            f"{r['max_abs_diff']:13.3g}"
        )
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--model-path", default=default_model_path(), help="checkpoint ($MODEL_PATH when set)"
    )
    parser.add_argument(
        "--format", default="onnx", choices=["onnx", "torchscript"],
        help="onnx (ONNX Runtime, no torch to serve it), or torchscript (torch.jit.trace: "
        "a .pt file that torch.jit.load reads without source/)",
    )  # fmt: skip
    parser.add_argument(
        "--quantize", default="none", choices=["none", "int8"], help="also write an int8 model"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="fp32 ONNX file (default: the checkpoint's path with .onnx, or .pt with --format "
        "torchscript); int8 goes beside it as <name>.int8.onnx",
    )
    parser.add_argument(
        "--graph-optimizer",
        default="runtime",
        choices=["runtime", "transformers"],
        help="runtime: standard ONNX ops, fused by ONNX Runtime at load (portable); "
        "transformers: bake in onnxruntime.transformers.optimizer's fusions (ONNX Runtime only)",
    )
    parser.add_argument("--data", default=None, help="verification data (default: the model's)")
    parser.add_argument(
        "--max-images", type=int, default=0, help="verify on at most this many images; 0 = all"
    )
    parser.add_argument("--atol", type=float, default=1e-3, help="fp32: largest |logit diff|")
    parser.add_argument(
        "--min-agreement", type=float, default=0.99, help="fp32: smallest top-1 agreement"
    )
    parser.add_argument(
        "--max-int8-drop", type=float, default=0.5, help="int8: most accuracy points lost"
    )
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    parser.add_argument(
        "--run-id",
        default=None,
        help="log the files and the verification into this existing run (with --tracker none: "
        "the local run folder of that name)",
    )
    parser.add_argument(
        "--tracker", default="none", choices=("none", "mlflow", "neptune"), help="of --run-id"
    )
    parser.add_argument("--runs-dir", default="runs", help="local run folders")
    return parser


def verification_data(ckpt: dict, args):
    """The test-split loader (eval transform), the data's name, and the calibration batches
    for an int8 conv tokenizer (None when not needed); raises preprocessing.DataError."""
    splits = load_data(ckpt, args.data)
    loader, data = test_images(*splits, args.max_images)
    calibration = None
    if args.quantize == "int8" and Q.has_conv_tokenizer(ckpt["config"]):
        calibration = Q.calibration_batches(*splits)
    return loader, data, calibration


def write_files(model, ckpt: dict, args, out: Path, int8_out: Path | None, calibration):
    """Export (and quantize) into `out` (and `int8_out`); returns the runners of the files.
    Raises OnnxError after deleting whatever it wrote."""
    props = metadata_for(ckpt, args.model_path)
    written = []
    try:
        written.append(export_model(model, ckpt["preprocessing"]["image_size"], out, props))
        if int8_out is not None:  # from the standard graph: the quantizer cannot type contrib ops
            written.append(Q.quantize_int8(out, int8_out, props, calibration))
        if args.graph_optimizer == "transformers":
            _, fused = optimize_transformers(out, out, ckpt["config"], props)
            print(f"onnxruntime.transformers.optimizer fused: {fused or 'nothing'}")
        runners = {"onnx": OnnxRunner(out, threads=args.threads)}
        if int8_out is not None:
            runners["int8"] = OnnxRunner(int8_out, threads=args.threads)
        return runners
    except OnnxError:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    import preprocessing as P
    from checkpoint import CheckpointError, load_model
    from runtime import default_threads, set_torch_threads

    try:
        model, ckpt = load_model(args.model_path)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "torchscript" and args.quantize != "none":
        print("error: --quantize int8 is for --format onnx", file=sys.stderr)
        return 2
    suffix = ".pt" if args.format == "torchscript" else ".onnx"
    out = Path(args.out) if args.out else Path(args.model_path).with_suffix(suffix)
    int8_out = out.with_name(out.stem + ".int8.onnx") if args.quantize == "int8" else None
    try:
        loader, data, calibration = verification_data(ckpt, args)
    except P.DataError as err:
        print(f"error: cannot load verification images: {err}", file=sys.stderr)
        return 2

    set_torch_threads(args.threads or default_threads())
    if args.format == "torchscript":
        return export_torchscript(model, ckpt, args, out, loader, data)
    try:
        runners = write_files(model, ckpt, args, out, int8_out, calibration)
    except OnnxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    report = compare(model, runners, loader)
    files = {name: runner.path for name, runner in runners.items()}
    sizes = {name: path.stat().st_size for name, path in files.items()}
    print(f"verification on the test split of {data} ({report['pytorch']['images']} images):")
    print(format_report(report, sizes))
    problems = check(report, args.atol, args.min_agreement, args.max_int8_drop)
    # An int8 file made from a rejected fp32 file goes with it; a passing fp32 file stays.
    rejected = [name for name in files if problems["onnx"] or problems.get(name)]
    deleted = [str(files.pop(name)) for name in rejected]
    for path in deleted:
        Path(path).unlink(missing_ok=True)
    if rejected:
        print(
            f"error: the export does not match the PyTorch model, so {' and '.join(deleted)} "
            "was deleted: " + "; ".join(p for name in rejected for p in problems.get(name, [])),
            file=sys.stderr,
        )
        if not files:
            return 1

    summary = {
        "model_path": str(args.model_path),
        "onnx": str(out),
        "int8": str(files["int8"]) if "int8" in files else None,
        "classes": ckpt["classes"],
        "preprocessing": ckpt["preprocessing"],
        "verification": {"data": data, **report},
        "file_bytes": sizes,
    }
    report_path = out.with_name(out.name + ".json")
    report_path.write_text(json.dumps(summary, indent=2) + "\n")
    for path in files.values():
        print(f"wrote {path}")
    if args.run_id:
        log_to_run(args, [*files.values(), report_path], report)
    return 1 if rejected else 0


def export_torchscript(model, ckpt: dict, args, out: Path, loader, data: str) -> int:
    """Trace the model into `out` (class names and preprocessing in its extra file), read it
    back as predict.py does, and verify it against the PyTorch model like an ONNX file: 0,
    or 1 with the file deleted when it disagrees beyond --atol / --min-agreement."""
    import torch

    from fileio import atomic_write
    from torch_serving import TORCHSCRIPT_METADATA, TorchScriptBackend, torchscript_metadata

    size = int(ckpt["preprocessing"]["image_size"])
    example = torch.zeros(2, 3, size, size)  # batch 2: the batch dimension is traced, not fixed
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
    extra = {TORCHSCRIPT_METADATA: torchscript_metadata(ckpt)}
    atomic_write(out, lambda f: torch.jit.save(traced, f, _extra_files=extra))
    report = compare(model, {"torchscript": TorchScriptBackend(out, "cpu")}, loader)
    print(f"verification on the test split of {data} ({report['pytorch']['images']} images):")
    print(format_report(report, {"torchscript": out.stat().st_size}))
    result = report["torchscript"]
    if result["max_abs_diff"] > args.atol or result["top1_agreement"] < args.min_agreement:
        out.unlink(missing_ok=True)
        print(
            f"error: the TorchScript file does not match the PyTorch model (largest |logit "
            f"diff| {result['max_abs_diff']:.3g}, top-1 agreement "
            f"{result['top1_agreement']:.2%}), so {out} was deleted",
            file=sys.stderr,
        )
        return 1
    summary = {"model_path": str(args.model_path), "torchscript": str(out),
               "classes": ckpt["classes"], "preprocessing": ckpt["preprocessing"],
               "verification": {"data": data, **report}}  # fmt: skip
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    if args.run_id:
        log_to_run(args, [out, out.with_name(out.name + ".json")], report)
    return 0


def log_to_run(args, files: list[Path], report: dict) -> None:
    """Attach the exported files and their verification to an existing tracking run."""
    import tracking

    run = tracking.open_run(args.tracker, run_id=args.run_id, runs_dir=args.runs_dir)
    try:
        run.log_metrics(
            {f"export/{name}_{k}": v for name, r in report.items() for k, v in r.items()}, step=0
        )
        for path in files:
            run.log_artifact(path)
    finally:
        run.finish()
    print(f"logged {len(files)} file(s) to {args.tracker} run {args.run_id}")


if __name__ == "__main__":
    sys.exit(main())
