"""Normalise an ArcFace-style ONNX FR model into the form pruning and scoring need.

`normalise_fr_model` returns a float model with exactly one output (the embedding), a symbolic
batch dimension, constant subgraphs folded into initializers, and every Conv/MatMul/Gemm weight a
float initializer, so `engines.prune` can act on it:

- ONNX Runtime *dynamic* quantisation (DynamicQuantizeLinear -> ConvInteger/MatMulInteger -> Cast
  -> Mul(x_scale * w_scale) [-> Add(bias)]) becomes a float Conv / Gemm / MatMul with weight
  (w_q - w_zero) * w_scale, per tensor or per output channel, the bias folded in where it is a plain
  Add of a per-channel constant. The activation quantisation is dropped, so the float model differs
  slightly from the quantised one.
- QDQ weights (DequantizeLinear of constants) are folded into float initializers by constant folding;
  any other quantised pattern (QLinearConv, activation QuantizeLinear, ...) is an error.
- Reshapes on the activation path whose constant shape starts with a literal 1 get 0 (copy the batch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

BATCH = "batch"
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
            "Bernoulli"}
_QUANT_OPS = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger"}


def normalise_fr_model(
    model: onnx.ModelProto, output: str | None = None, *, check_batch: bool = True
) -> onnx.ModelProto:
    """A copy of `model` normalised for pruning and scoring (see the module docstring).

    output: the embedding tensor to keep (a graph output or any node output); None = the model's only
    output. check_batch: run a batch of 3 random inputs in ONNX Runtime and compare with 3 single runs.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if m.ir_version < 4:  # initializers listed as inputs: drop them there, IR >= 4 allows it
        inits = {t.name for t in g.initializer}
        keep = [i for i in g.input if i.name not in inits]
        del g.input[:]
        g.input.extend(keep)
        m.ir_version = 4
    _select_output(m, output)
    _fold_constants(m)
    _dequantise(m)
    _strip_dead(m)
    left = sorted({n.op_type for n in g.node if n.op_type in _QUANT_OPS or n.op_type.startswith("QLinear")})
    if left:
        raise ValueError(f"unrecognised quantised pattern: {', '.join(left)} nodes remain (only ONNX Runtime "
                         "dynamic quantisation and constant QDQ weights are dequantised)")
    _dynamic_batch(m)
    for i, n in enumerate(g.node):
        n.name = n.name or f"{n.op_type}_{i}"
    del g.value_info[:]
    onnx.checker.check_model(m, full_check=True)
    m = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    if check_batch:
        check_dynamic_batch(m)
    ops = {n.op_type for n in m.graph.node}
    log.info("normalised FR model: %d nodes, %d initializers, output %s, ops %s",
             len(m.graph.node), len(m.graph.initializer), m.graph.output[0].name, ",".join(sorted(ops)))
    return m


def _sub_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Every tensor name a node reads, including outer-scope names its subgraphs use."""
    yield from node.input
    for a in node.attribute:
        for sg in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for n in sg.node:
                yield from _sub_inputs(n)


def _strip_dead(m: onnx.ModelProto) -> None:
    """Remove nodes that do not reach the graph outputs, and initializers nothing reads."""
    g = m.graph
    live = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for n in reversed(g.node):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(_sub_inputs(n))
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)


def _select_output(m: onnx.ModelProto, output: str | None) -> None:
    g = m.graph
    names = [o.name for o in g.output]
    if output is None:
        if len(names) != 1:
            raise ValueError(f"the model has {len(names)} outputs {names}: choose the embedding (`output`)")
        output = names[0]
    if output in names:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(g.output[names.index(output)])
    elif any(output in n.output for n in g.node):
        inferred = onnx.shape_inference.infer_shapes(m)
        known = {v.name: v for v in inferred.graph.value_info}
        vi = known.get(output) or helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
    else:
        raise ValueError(f"output {output!r} not found in the model: its outputs are {names}")
    del g.output[:]
    g.output.append(vi)
    _strip_dead(m)


def _fold_constants(m: onnx.ModelProto) -> None:
    """Evaluate every node whose inputs are all constant and store its outputs as initializers."""
    from onnx.reference import ReferenceEvaluator

    g = m.graph
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    outputs = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    folded = 0
    for n in g.node:
        foldable = (
            n.domain in ("", "ai.onnx")
            and n.op_type not in _NO_FOLD
            and all(i in consts for i in n.input if i)
            and not any(o in outputs for o in n.output)
            and not any(a.g.node or a.graphs for a in n.attribute)
        )
        if foldable:
            try:
                feeds = {i: consts[i] for i in n.input if i}
                values = ReferenceEvaluator(n, opsets={"": opset}).run(None, feeds)
            except Exception as e:  # noqa: BLE001 - an op the reference cannot run stays a node
                log.debug("cannot fold %s %s: %s", n.op_type, n.name, e)
            else:
                for name, v in zip(n.output, values, strict=True):
                    if name:
                        consts[name] = np.asarray(v)
                        g.initializer.append(numpy_helper.from_array(consts[name], name))
                folded += 1
                continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    _strip_dead(m)
    log.debug("constant folding: %d nodes folded into initializers", folded)


def _per_channel(v: np.ndarray, n: int, axis: int, rank: int, what: str, where: str) -> np.ndarray:
    """`v` (broadcast against a tensor of `rank` dims) as a length-n vector along `axis`, or raise."""
    if v.size == 1:
        return np.full(n, v.reshape(()), np.float64)
    shape = (1,) * (rank - v.ndim) + v.shape
    want = tuple(n if d == axis else 1 for d in range(rank))
    if v.ndim > rank or shape != want:
        raise ValueError(f"{where}: {what} of shape {list(v.shape)} is neither per tensor nor per channel")
    return v.reshape(-1).astype(np.float64)


def _dequantise(m: onnx.ModelProto) -> None:
    """Replace ONNX Runtime dynamic-quantisation patterns by float Conv / Gemm / MatMul."""
    g = m.graph
    if not any(n.op_type in ("ConvInteger", "MatMulInteger") for n in g.node):
        return
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in _sub_inputs(n):
            consumers.setdefault(i, []).append(n)
    graph_out = {o.name for o in g.output}
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in onnx.shape_inference.infer_shapes(m).graph.value_info
        if v.type.tensor_type.HasField("shape")
    }
    taken = {o for n in g.node for o in n.output} | set(inits) | {i.name for i in g.input}
    const = lambda name: numpy_helper.to_array(inits[name]) if name in inits else None  # noqa: E731
    drop: set[str] = set()  # outputs of the nodes a replacement makes redundant
    replace: dict[int, onnx.NodeProto] = {}

    def only(name: str, op: str, where: str) -> onnx.NodeProto:
        users = consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op or name in graph_out:
            raise ValueError(f"{where}: expected {name!r} to feed exactly one {op}, found "
                             f"{[u.op_type for u in users] + ['graph output'] * (name in graph_out)}")
        return users[0]

    for idx, q in enumerate(g.node):
        if q.op_type not in ("ConvInteger", "MatMulInteger"):
            continue
        is_conv = q.op_type == "ConvInteger"
        where = f"{q.op_type} {q.name or q.output[0]!r}"
        dql = producer.get(q.input[0])
        if dql is None or dql.op_type != "DynamicQuantizeLinear":
            raise ValueError(f"{where}: input is not a DynamicQuantizeLinear output (unrecognised quantised "
                             "pattern)")
        if len(q.input) > 2 and q.input[2] and q.input[2] != dql.output[2]:
            raise ValueError(f"{where}: activation zero point does not come from its DynamicQuantizeLinear")
        w_q = const(q.input[1])
        if w_q is None:
            raise ValueError(f"{where}: weight {q.input[1]!r} is not a constant")
        zp = const(q.input[3]) if len(q.input) > 3 and q.input[3] else np.zeros((), w_q.dtype)
        if zp is None:
            raise ValueError(f"{where}: weight zero point is not a constant")
        cast = only(q.output[0], "Cast", where)
        if helper.get_attribute_value(cast.attribute[0]) != TensorProto.FLOAT:
            raise ValueError(f"{where}: its Cast is not to float")
        mul = only(cast.output[0], "Mul", where)
        scales = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        smul = producer.get(scales)
        if smul is None or smul.op_type != "Mul" or dql.output[1] not in smul.input:
            raise ValueError(f"{where}: output scale is not Mul(activation scale, weight scale)")
        w_scale = const(smul.input[1] if smul.input[0] == dql.output[1] else smul.input[0])
        if w_scale is None:
            raise ValueError(f"{where}: weight scale is not a constant")

        # Weight layout: Conv [M, C, k...] (channel axis 0, output rank = weight rank);
        # MatMul [K, N] (per column, output [..., N]).
        n_out = w_q.shape[0] if is_conv else w_q.shape[-1]
        out_rank = w_q.ndim if is_conv else max(2, ranks.get(q.input[0], 2))
        out_axis = 1 if is_conv else out_rank - 1
        s = _per_channel(w_scale, n_out, out_axis, out_rank, "weight scale", where)
        z = _per_channel(zp, n_out, max(zp.ndim, 1) - 1, max(zp.ndim, 1), "weight zero point", where)
        bshape = (-1,) + (1,) * (w_q.ndim - 1) if is_conv else (1, -1)
        w = ((w_q.astype(np.float64) - z.reshape(bshape)) * s.reshape(bshape)).astype(np.float32)

        add = consumers.get(mul.output[0], [])
        bias = None
        if len(add) == 1 and add[0].op_type == "Add" and mul.output[0] not in graph_out:
            b_name = add[0].input[1] if add[0].input[0] == mul.output[0] else add[0].input[0]
            b = const(b_name)
            if b is not None:
                try:
                    bias = _per_channel(b, n_out, out_axis, out_rank, "bias", where).astype(np.float32)
                except ValueError:
                    bias = None
        use_gemm = not is_conv and bias is not None and ranks.get(q.input[0]) == 2 and w.ndim == 2
        if not is_conv and not use_gemm:
            bias = None

        base = q.input[1].removesuffix("_quantized") or q.input[1]
        w_name = base if base not in taken else f"{base}_dequantized"
        taken.add(w_name)
        g.initializer.append(numpy_helper.from_array(w, w_name))
        ins = [dql.input[0], w_name]
        if bias is not None:
            b_name = f"{w_name}_bias" if f"{w_name}_bias" not in taken else f"{w_name}_dequantized_bias"
            taken.add(b_name)
            g.initializer.append(numpy_helper.from_array(bias, b_name))
            ins.append(b_name)
        out = add[0].output[0] if bias is not None else mul.output[0]
        name = (q.name.removesuffix("_quant") if q.name else "") or out
        op = "Conv" if is_conv else ("Gemm" if use_gemm else "MatMul")
        attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute} if is_conv else {}
        replace[idx] = helper.make_node(op, ins, [out], name=name, **attrs)
        drop.update([cast.output[0], mul.output[0]] + ([out] if bias is not None else []))
        log.debug("%s -> %s %s, weight %s %s, %s scale, bias %s", where, op, name, w_name, list(w.shape),
                  "per-channel" if w_scale.size > 1 else "per-tensor", "kept" if bias is None else "folded")

    nodes = [replace.get(i, n) for i, n in enumerate(g.node) if i in replace or n.output[0] not in drop]
    del g.node[:]
    g.node.extend(nodes)
    _strip_dead(m)
    log.info("dequantised %d ConvInteger/MatMulInteger patterns into float layers", len(replace))


def _set_batch(vi: onnx.ValueInfoProto) -> None:
    dims = vi.type.tensor_type.shape.dim
    if vi.type.tensor_type.HasField("shape") and len(dims) > 0:
        dims[0].Clear()
        dims[0].dim_param = BATCH


def _dynamic_batch(m: onnx.ModelProto) -> None:
    """Symbolic batch on input and output; Reshapes on the activation path copy dim 0 instead of a 1."""
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    active = {i.name for i in g.input if i.name not in inits}
    for vi in [i for i in g.input if i.name not in inits] + list(g.output):
        _set_batch(vi)
    fixed = 0
    for n in g.node:
        if not any(i in active for i in _sub_inputs(n)):
            continue
        active.update(n.output)
        if n.op_type != "Reshape" or n.input[0] not in active or n.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[n.input[1]])
        if shape.ndim != 1 or shape.size == 0 or shape[0] != 1:
            continue
        allow_zero = next((a for a in n.attribute if a.name == "allowzero"), None)
        if allow_zero is not None and allow_zero.i:
            if (shape == 0).any():
                raise ValueError(f"Reshape {n.name!r}: shape {shape.tolist()} has allowzero and zeros: "
                                 "cannot make its dim 0 dynamic")
            allow_zero.i = 0
        new = shape.copy()
        new[0] = 0
        name = f"{n.input[1]}_batch"
        if name not in inits:
            inits[name] = numpy_helper.from_array(new, name)
            g.initializer.append(inits[name])
        n.input[1] = name
        fixed += 1
    _strip_dead(m)
    log.debug("dynamic batch: %d Reshape(s) on the activation path now copy dim 0", fixed)


def check_dynamic_batch(model: onnx.ModelProto, batch: int = 3, seed: int = 0) -> None:
    """Run `batch` random inputs at once and one by one in ONNX Runtime (CPU); raise if they differ."""
    import onnxruntime as ort

    inp = model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    if len(model.graph.input) != 1 or not all(shape):
        log.warning("batch check skipped: needs one input with static non-batch dims, got %s", shape)
        return
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).normal(0, 1, (batch, *shape)).astype(np.float32)
    together = sess.run(None, {inp.name: x})[0]
    alone = np.concatenate([sess.run(None, {inp.name: x[i : i + 1]})[0] for i in range(batch)])
    err = float(np.abs(together - alone).max()) if together.shape == alone.shape else np.inf
    if not err <= 1e-4 * max(1.0, float(np.abs(alone).max())):
        raise ValueError(f"the model does not batch: a batch of {batch} gives shape {list(together.shape)} "
                         f"and differs from single runs (max abs diff {err:.3g})")
