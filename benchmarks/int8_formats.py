"""Which int8 format of ONNX Runtime is fastest on this CPU: what export.py writes (dynamic
int8 MatMuls, a conv tokenizer statically quantized), dynamic int8 MatMuls alone, static
(calibrated activations) and weight-only MatMulNBits, all in one run.

    .venv/bin/python benchmarks/int8_formats.py                     # digits, cifar10, cifar10-vit
    .venv/bin/python benchmarks/int8_formats.py --shapes digits --quick

Each shape of benchmarks/speed.py is built with random weights (seed 0), exported with
source/export.py, and quantized every way below; batch-1 latencies are timed in interleaved
rounds with one thread and judged on process CPU time (speed.py's method). Accuracy is not
measured here (random weights); the max |logit difference| against fp32 on one image shows
how much each format perturbs the model. Writes metadata/results/int8-formats.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "source"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import export  # noqa: E402
import onnx_io  # noqa: E402
import quantize  # noqa: E402
import speed  # noqa: E402

NUM_CLASSES = 10
CALIBRATION_IMAGES = 16


def static_int8(fp32: Path, out: Path, images: list[np.ndarray], fmt: str, ops: list[str]):
    """quantize_static: weights QInt8, activations QUInt8 calibrated (min-max) on `images`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with onnx_io.quiet_logging():
        quantize_static(
            fp32,
            out,
            quantize.calibration_reader([image[None] for image in images]),
            quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator,
            op_types_to_quantize=ops,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return out


def nbits(fp32: Path, out: Path, bits: int, block: int, int8_compute: bool) -> Path:
    """MatMulNBits: weight-only block quantization (ONNX Runtime's path for LLMs)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with onnx_io.quiet_logging():
        quantizer = MatMulNBitsQuantizer(
            onnx.load(fp32),
            bits=bits,
            block_size=block,
            is_symmetric=True,
            accuracy_level=4 if int8_compute else None,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), False)
    return out


def variants_for(
    fp32: Path, props: dict, work: Path, images: list[np.ndarray], quick: bool
) -> dict:
    """name -> ONNX file, every format this script compares (static and NBits files keep
    the fp32 file's metadata)."""
    files = {
        "fp32": fp32,
        "int8 (export.py)": quantize.quantize_int8(
            fp32, work / "export.onnx", props, [np.stack(images)]
        ),
        # export.py without calibration images: a conv tokenizer stays fp32
        "dynamic int8, MatMul only": quantize.quantize_int8(fp32, work / "dynamic.onnx", props),
    }
    static = [("QOperator", ["MatMul"]), ("QDQ", ["MatMul"])]
    if not quick:
        static += [("QOperator", ["MatMul", "Conv", "Add", "Gemm"])]
        static += [("QDQ", ["MatMul", "Conv", "Add", "Gemm"])]
    for fmt, ops in static:
        name = f"static int8 {fmt}, {'+'.join(ops)}"
        files[name] = static_int8(fp32, work / f"static-{fmt}-{len(ops)}.onnx", images, fmt, ops)
    settings = [(8, 32, True), (4, 32, True)]
    if not quick:
        settings += [(8, 128, True), (8, 32, False), (4, 128, True), (4, 32, False)]
    for bits, block, int8_compute in settings:
        name = f"MatMulNBits {bits}-bit, block {block}" + (", int8 compute" if int8_compute else "")
        out = work / f"nbits-{bits}-{block}-{int(int8_compute)}.onnx"
        files[name] = nbits(fp32, out, bits, block, int8_compute)
    return files


def bench_shape(shape: str, work: Path, rounds: int, calls: int, quick: bool) -> dict:
    cfg = speed.preset_config(shape)
    model, meta = speed.random_model(cfg)
    work.mkdir(parents=True, exist_ok=True)
    props = onnx_io.metadata_for(meta, "benchmark")
    fp32 = export.export_model(model, cfg.image_size, work / "fp32.onnx", props)
    rng = np.random.default_rng(0)
    size = (3, cfg.image_size, cfg.image_size)
    calibration = [rng.standard_normal(size, dtype=np.float32) for _ in range(CALIBRATION_IMAGES)]
    files = variants_for(fp32, props, work, calibration, quick)
    runners = {name: onnx_io.OnnxRunner(path, threads=1) for name, path in files.items()}
    image = rng.standard_normal((1, *size), dtype=np.float32)
    reference = runners["fp32"].logits(image)
    cpu: dict = {}
    speed.interleaved(
        {name: (lambda r=r: r.logits(image)) for name, r in runners.items()},
        rounds=rounds,
        calls=calls,
        cpu=cpu,
    )
    base = statistics.median(cpu["fp32"])
    rows = {}
    for name, runner in runners.items():
        ms = statistics.median(cpu[name]) * 1e3
        rows[name] = {
            "cpu_ms_p50": ms,
            "vs_fp32": ms / (base * 1e3),
            "max_abs_diff": float(np.abs(runner.logits(image) - reference).max()),
            "file_mb": files[name].stat().st_size / 2**20,
        }
    return {"description": speed.describe(cfg), "rows": rows}


def report(results: dict, argv: list[str]) -> str:
    lines = [
        "# int8 formats in ONNX Runtime",
        "",
        f"`python benchmarks/int8_formats.py {' '.join(argv)}`".replace(" `", "`"),
        "",
        f"Machine: {speed.cpu_name()}, one thread; load average at the end {speed.load_average()}."
        " Batch-1 latency by process CPU time (median), random weights and images.",
    ]
    for shape, result in results.items():
        lines += ["", f"## {shape}: {result['description']}", ""]
        lines += ["| format | batch 1 CPU ms | vs fp32 | max abs logit diff | file MB |"]
        lines += ["| --- | ---: | ---: | ---: | ---: |"]
        for name, row in result["rows"].items():
            lines.append(
                f"| {name} | {row['cpu_ms_p50']:.3f} | {row['vs_fp32']:.2f}x "
                f"| {row['max_abs_diff']:.4f} | {row['file_mb']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", default="digits,cifar10,cifar10-vit", help="speed.py's shape names"
    )
    parser.add_argument("--quick", action="store_true", help="few formats and timings (tests)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "metadata" / "results" / "int8-formats.md"
    )
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in speed.SHAPES]
    if unknown or not shapes:
        print(f"error: --shapes takes names from {', '.join(speed.SHAPES)}", file=sys.stderr)
        return 2
    rounds, calls = (1, 2) if args.quick else (10, 30)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            shape: bench_shape(shape, Path(tmp) / shape, rounds, calls, args.quick)
            for shape in shapes
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = report(results, argv)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
