"""The shared-trunk graph: one ONNX model whose first two outputs are the dense and the pruned twin embedding.

Every node that depends, directly or through later paths (residual adds included), on a pruned
weight is duplicated with the pruned weights; every node before the first pruned one is shared, so a
deep recipe costs a fraction of a second dense pass instead of a whole one.

The graph also reports the dense pass's activation statistics at STAT_DEPTHS (per channel, the spatial mean of x
and of x^2 of the input of the Conv at that relative depth): free by-products that the selection score compares
with their values on clean calibration faces (agent/quality/selection.py).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from engines.recipe import STAT_DEPTHS, STATS, TWIN

log = logging.getLogger(__name__)



def shared_trunk(dense: onnx.ModelProto, twin: onnx.ModelProto, twin_output: str = "embedding_twin") -> onnx.ModelProto:
    """Merge a dense model and its pruned twin (same graph, some initializers changed) into one graph."""
    if len(dense.graph.output) != 1:
        raise ValueError("the shared trunk needs a model with exactly one output (the embedding)")
    dense_inits = {t.name: t for t in dense.graph.initializer}
    changed = {
        t.name: t for t in twin.graph.initializer if t.name not in dense_inits or t != dense_inits[t.name]
    }
    if not changed:
        raise ValueError("the twin has no weight that differs from the dense model")

    tainted: set[str] = set(changed)  # tensor names whose value differs in the twin
    new_nodes: list[onnx.NodeProto] = []
    dup = 0
    for node in dense.graph.node:
        new_nodes.append(node)
        if not any(i in tainted for i in node.input):
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = TWIN + node.name
        del copy.input[:]
        copy.input.extend(TWIN + i if i in tainted else i for i in node.input)
        del copy.output[:]
        copy.output.extend(TWIN + o if o else o for o in node.output)
        tainted.update(o for o in node.output if o)
        new_nodes.append(copy)
        dup += 1

    out_name = dense.graph.output[0].name
    if out_name not in tainted:
        raise ValueError("the pruned weights do not reach the output")
    merged = onnx.ModelProto()
    merged.CopyFrom(dense)
    g = merged.graph
    del g.node[:]
    g.node.extend(new_nodes)
    for name, t in changed.items():
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = TWIN + name
        g.initializer.append(c)
    # Rename the twin's output tensor through an Identity so both outputs keep readable names.
    g.node.append(helper.make_node("Identity", [TWIN + out_name], [twin_output], name="twin_output"))
    vi = onnx.ValueInfoProto()
    vi.CopyFrom(dense.graph.output[0])
    vi.name = twin_output
    g.output.append(vi)
    del g.value_info[:]
    add_activation_stats(merged)
    onnx.checker.check_model(merged)
    log.info("shared trunk: %d of %d nodes duplicated for the twin", dup, len(dense.graph.node))
    return merged


def stat_tensors(model: onnx.ModelProto, depths: tuple[float, ...] = STAT_DEPTHS) -> list[str]:
    """The tensors whose statistics the pair reports: the input of the Conv at each relative depth."""
    convs = [n for n in model.graph.node if n.op_type == "Conv" and not n.name.startswith(TWIN)]
    if not convs:
        return []
    return [convs[min(round(d * len(convs)), len(convs) - 1)].input[0] for d in depths]


def add_activation_stats(model: onnx.ModelProto, depths: tuple[float, ...] = STAT_DEPTHS) -> None:
    """Append outputs `stats/<i>/mean` and `stats/<i>/meansq` [N, C] (spatial means of x and x^2, NCHW) for each
    tensor of `stat_tensors`."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    g = model.graph
    for i, tensor in enumerate(stat_tensors(model, depths)):
        sq = f"{STATS}{i}/square"
        g.node.append(helper.make_node("Mul", [tensor, tensor], [sq], name=sq))
        for src, name in ((tensor, f"{STATS}{i}/mean"), (sq, f"{STATS}{i}/meansq")):
            if opset >= 18:  # axes became an input
                axes = f"{STATS}axes"
                if not any(t.name == axes for t in g.initializer):
                    g.initializer.append(helper.make_tensor(axes, onnx.TensorProto.INT64, [2], [2, 3]))
                g.node.append(helper.make_node("ReduceMean", [src, axes], [name], name=name, keepdims=0))
            else:
                g.node.append(helper.make_node("ReduceMean", [src], [name], name=name, axes=[2, 3], keepdims=0))
            g.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", "channels"]))


def count_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates of every Conv, Gemm and MatMul node at batch 1 (shapes from ONNX shape inference)."""
    g = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim]
              for v in [*g.value_info, *g.input, *g.output]}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    macs = {}
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        a, w, y = (shapes.get(x) for x in (n.input[0], n.input[1], n.output[0]))
        if a is None or w is None or not y:
            raise ValueError(f"{n.op_type} {n.name}: shapes not inferred")
        if n.op_type == "Conv":
            k = int(np.prod(w[1:]))  # (C / group) * kernel
        elif n.op_type == "Gemm" and any(at.name == "transA" and at.i for at in n.attribute):
            k = a[0]
        else:
            k = a[-1]
        macs[n.name] = int(np.prod(y)) * k
    return macs


def twin_cost(pair: onnx.ModelProto, sparse_24: bool) -> tuple[float, float]:
    """(twin-branch MACs / dense MACs, the same with the pruned layers at half cost when `sparse_24`)."""
    macs = count_macs(pair)
    pruned = {n.name for n in pair.graph.node if n.name.startswith(TWIN) and len(n.input) > 1
              and n.input[1].startswith(TWIN)}
    dense = sum(v for k, v in macs.items() if not k.startswith(TWIN))
    twin = sum(v for k, v in macs.items() if k.startswith(TWIN))
    half = sum(v for k, v in macs.items() if k in pruned) / 2 if sparse_24 else 0.0
    return twin / dense, (twin - half) / dense
