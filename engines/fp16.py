"""FP16 export of an FP32 ONNX model, with onnx only (no onnxconverter-common, no ModelOpt).

Used for ONNX Runtime's CUDA backend and for TensorRT 11 (strongly typed networks take their precision
from the ONNX types). Rules:
- every node upstream of a Conv/Gemm/MatMul (and those nodes) runs in FP16: their float initializers,
  Constant values and Cast targets become float16;
- the tail after the last heavy op (here the L2 normalisation: x*x, ReduceSum, Sqrt, Reciprocal, with
  a 1e-10 floor that FP16 cannot hold) stays FP32: it costs nothing and FP16 would over/underflow there;
- graph inputs and outputs stay float32, with Cast nodes at the edges, so callers feed and read float32
  whatever the engine runs inside.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.common.cache import atomic_write, locked, sha256_file

log = logging.getLogger(__name__)

HEAVY = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# (op, input index) that the ONNX schema pins to float32 whatever the data type.
KEEP_FP32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}
FP16_MAX = float(np.finfo(np.float16).max)


def _fp16_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes that feed (or are) a heavy op: the FP16 part of the graph."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    todo = [i for i, n in enumerate(graph.node) if n.op_type in HEAVY]
    seen: set[int] = set()
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo.extend(producer[x] for x in graph.node[i].input if x in producer)
    return seen


def _half_tensor(t: TensorProto, name: str | None = None) -> TensorProto:
    a = numpy_helper.to_array(t)
    clipped = np.clip(a, -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(clipped, name if name is not None else t.name)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of `model` (float32 I/O kept; see the module docstring)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    dtype: dict[str, int] = {}
    for v in [*g.input, *g.value_info, *g.output]:
        dtype[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        dtype[t.name] = t.data_type
    half = _fp16_nodes(g)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    new_inits: dict[str, TensorProto] = {}
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []
    # Values whose current element type is float16 (produced by an FP16 node, or a converted initializer).
    is_half: set[str] = set()

    def as_type(name: str, want_half: bool) -> str:
        """`name` in the wanted float type: the initializer converted, or a Cast node inserted once."""
        if dtype.get(name) != TensorProto.FLOAT or (name in is_half) == want_half:
            return name
        if name in inits and want_half:
            key = name + "_fp16"
            new_inits.setdefault(key, _half_tensor(inits[name], key))
            return key
        to = TensorProto.FLOAT16 if want_half else TensorProto.FLOAT
        if (name, to) not in casts:
            casts[(name, to)] = f"{name}_as_{'fp16' if want_half else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [casts[(name, to)]], name=casts[(name, to)], to=to))
        return casts[(name, to)]

    for i, node in enumerate(model.graph.node):
        n = onnx.NodeProto()
        n.CopyFrom(node)
        want_half = i in half
        del n.input[:]
        for j, x in enumerate(node.input):
            keep32 = (node.op_type, j) in KEEP_FP32_INPUTS or node.op_type == "Cast"
            n.input.append(x if not x or keep32 else as_type(x, want_half))
        if want_half:
            for a in n.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
                elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(_half_tensor(a.t))
            is_half.update(o for o in node.output if dtype.get(o) == TensorProto.FLOAT)
        nodes.append(n)

    # Outputs produced in FP16 get a Cast back to float32 under their own name.
    renamed = {o: o + "_fp16" for o in outputs & is_half}
    for n in nodes:
        n.output[:] = [renamed.get(o, o) for o in n.output]
        n.input[:] = [renamed.get(x, x) for x in n.input]
    nodes.extend(helper.make_node("Cast", [h], [o], name=o + "_to_fp32", to=TensorProto.FLOAT)
                 for o, h in renamed.items())

    used = {x for n in nodes for x in n.input}
    kept = [t for t in graph.initializer if t.name in used and t.name not in new_inits]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for k, t in new_inits.items() if k in used])
    del graph.value_info[:]
    onnx.checker.check_model(out)
    return out


def fp16_model_path(src: Path) -> Path:
    """The FP16 export of `src`, made (once, under a lock) beside it, named by the source's sha256."""
    dst = src.parent / "fp16" / f"{src.stem}-{sha256_file(src)[:12]}.onnx"
    with locked(dst):
        if not dst.is_file():
            log.info("exporting %s to FP16", src)
            model = to_fp16(onnx.load(str(src)))
            atomic_write(dst, lambda p: onnx.save(model, str(p)))
    return dst
