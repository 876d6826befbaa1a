"""Static INT8 (QDQ) copy of the shared-trunk pair graph, for ONNX Runtime on the CPU (`scoring.precision: int8`).

ONNX Runtime's quantizer calibrates each activation's range (min/max) on real aligned crops, then stores weights
as int8 per output channel and activations as uint8. `reduce_range` keeps weights to 7 bits: on x86 CPUs without
VNNI (AVX2 only) the 8-bit multiply-add saturates, and with full-range weights the dense embedding's cosine to
FP32 fell to 0.70 on some LFW faces (at least 0.985 with reduce_range; docs/PERFORMANCE.md).

The quantized graph lives in its own folder beside the recipe's (`<recipe>-int8/`), named by the FP32 graph's hash
and the calibration material's name, so the selection score's calibration (selection.json) is built for the numbers
it scores, while the FR model's ERS (one folder up) is shared with FP32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from agent.common.cache import atomic_write, locked, sha256_file, write_json
from engines.prepare import PreparedFR

log = logging.getLogger(__name__)

# One crop per calibration run: the calibrating session outputs every tensor's min and max, and its memory grows with
# the batch (peak RSS 1.2 GB at 8). ONNX Runtime's CalibMaxIntermediateOutputs would not help: it drops the batches
# it clears instead of folding them into the ranges (1.32).
CALIBRATION_BATCH = 1


def quantize_int8(src: Path, dst: Path, batches: np.ndarray) -> None:
    """Write the static INT8 (QDQ) copy of `src` to `dst`, its activation ranges from `batches` (N model inputs)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load(str(src), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.start >= len(batches):
                return None
            self.start += CALIBRATION_BATCH
            return {name: batches[self.start - CALIBRATION_BATCH : self.start]}

    def write(path: Path) -> None:
        pre = path.with_name(path.stem + "-pre.onnx")
        try:  # shape inference and graph clean-up first, as ONNX Runtime's quantizer recommends
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        finally:
            pre.unlink(missing_ok=True)

    atomic_write(dst, write)


def prepare_int8(prepared: PreparedFR, material: Callable[[], np.ndarray], material_id: str) -> PreparedFR:
    """`prepared` with its pair graph quantized to INT8, made once (under a lock) from `material()`: the model inputs of
    the calibration crops, which `material_id` names (change it when the material changes). Only the shared-trunk
    pair graph is quantized; dense and twin stay FP32."""
    folder = prepared.dir.with_name(f"{prepared.dir.name}-int8")
    dst = folder / f"pair-{sha256_file(prepared.pair)[:12]}-{material_id}.onnx"
    with locked(dst):
        if not dst.is_file():
            inputs = material()
            log.info("quantizing %s to INT8 on %d calibration crops (%s)", prepared.pair, len(inputs), material_id)
            quantize_int8(prepared.pair, dst, inputs)
            write_json(folder / "manifest.json", {**prepared.manifest, "precision": "int8", "pair": dst.name,
                                                  "calibration": material_id, "calibration_crops": len(inputs)})
    return replace(prepared, pair=dst, manifest={**prepared.manifest, "precision": "int8"}, dir=folder)
