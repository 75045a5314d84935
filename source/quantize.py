"""int8 for an exported ONNX model: dynamic int8 MatMul weights, a statically quantized conv
tokenizer, and the training images that calibrate it.

    path = quantize_int8(Path("model.onnx"), Path("model.int8.onnx"), props, calibration)

`source/export.py --quantize int8` calls it and verifies the result against PyTorch on the
test split; `calibration_batches` picks the calibration images from the training split.

Every int8 weight is 7-bit (`reduce_range`, -64..64). ONNX Runtime multiplies uint8
activations by int8 weights; on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) its kernels
add each pair of products in 16 bits (VPMADDUBSW), which saturates once
255 * |w1| + 255 * |w2| > 32767. With 8-bit weights (up to 127) the statically quantized conv
stem does (every output channel has a weight of 127): the quick-start digits model lost 4.5
accuracy points on an AVX2 CPU, 1.1 under an AVX2 emulation here; with 7-bit weights, 0.
7-bit MatMul weights too, so that no layer of any model can saturate on any CPU; on the
models measured they lost no accuracy, with VNNI or without.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from onnx_io import INPUT_NAME, quiet_logging, set_metadata, write_onnx

# Training images that calibrate the statically quantized conv tokenizer of an int8 model.
CALIBRATION_IMAGES = 256
# 7-bit weights: no uint8 x int8 product pair can saturate 16 bits (see the docstring).
REDUCE_RANGE = True


def quantize_int8(
    fp32_path: Path, out: Path, props: dict[str, str], calibration: list | None = None
) -> Path:
    """int8 weights for every MatMul, dynamic quantization: activations are quantized per
    batch at run time. With `calibration` (batches of preprocessed images) a CCT conv
    tokenizer runs in int8 too, statically quantized: its Conv-ReLU-MaxPool stages in uint8,
    activation ranges from those images (QDQ format, which ONNX Runtime runs as QLinearConv
    and uint8 MaxPool). Without them its convolutions stay fp32; dynamic quantization of a
    Conv (ConvInteger) is slower than fp32 here, and so is static quantization of the
    patch tokenizer's one strided conv (docs/benchmarks/speed.md)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    static_stem = has_conv_tokenizer(json.loads(props.get("config", "{}"))) and bool(calibration)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        folded, stem, raw = (Path(tmp) / f"{n}.onnx" for n in ("folded", "stem", "int8"))
        with quiet_logging():
            # The quantizer's pre-processing folds constants first (ONNX Runtime's basic
            # optimizations): the last block's q and kv weights, slices of the qkv weight,
            # become weights of their own that it quantizes too. Its symbolic shape inference
            # does not know opset 23's Attention, and the quantizer needs no shapes.
            quant_pre_process(fp32_path, folded, skip_symbolic_shape=True)
            if static_stem:
                quantize_stem(folded, stem, calibration)
            quantize_dynamic(
                stem if static_stem else folded,
                raw,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                reduce_range=REDUCE_RANGE,
            )
        proto = onnx.load(raw)
    scheme = "dynamic int8 (MatMul weights, QInt8, 7-bit)"
    if static_stem:
        scheme += f"; static uint8 conv tokenizer (QDQ, {sum(map(len, calibration))} images)"
    set_metadata(proto, {**props, "quantization": scheme})
    write_onnx(proto, out)
    return out


def has_conv_tokenizer(config: dict) -> bool:
    """A ViT with the CCT conv stem: the part of an int8 model quantized statically."""
    return config.get("arch", "vit") == "vit" and config.get("tokenizer") == "conv"


def quantize_stem(src: Path, out: Path, calibration: list) -> None:
    """Static int8 for the conv tokenizer only: per-channel 7-bit weights, uint8 activations
    whose ranges (min-max) come from the calibration batches; the first MatMul reads fp32
    again. On the digits and cifar10 presets this takes int8 from 0.63-0.72x to 0.56-0.58x
    of fp32's batch-1 latency (docs/benchmarks/speed.md)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    # The calibration session is the quantizer's own, on every core (it takes no thread
    # count); it runs once, over the calibration images only.
    quantize_static(
        src,
        out,
        calibration_reader(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "Relu", "MaxPool"],
        per_channel=True,
        reduce_range=REDUCE_RANGE,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def calibration_reader(batches: list, input_name: str = INPUT_NAME):
    """onnxruntime's CalibrationDataReader over image batches: {input_name: batch} each."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: np.asarray(batch, np.float32)}

    return Batches()


def calibration_batches(splits, cfg, count: int = CALIBRATION_IMAGES) -> list[np.ndarray]:
    """Up to `count` training images, evenly spaced from the first to the last of the split
    (so every class, also in a folder tree sorted by class), eval transform, as batches of
    arrays: what static quantization measures activation ranges on. Never test images."""
    import torch

    import preprocessing as P

    train = splits.train
    picks = np.linspace(0, len(train) - 1, min(count, len(train))).round().astype(int)
    subset = torch.utils.data.Subset(train, picks.tolist())
    return [x.numpy() for x, _ in P.make_loader(subset, cfg, train=False)]
