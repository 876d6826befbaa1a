"""Read frozen TensorFlow GraphDef (.pb) files without TensorFlow.

The message classes are built at runtime from a ``FileDescriptorProto`` that mirrors the
subset of ``tensorflow/core/framework/{graph,node_def,attr_value,tensor,tensor_shape,types}.proto``
needed to read frozen inference graphs. Field numbers match upstream TensorFlow; fields that
are not declared here (library, versions, debug info, ...) are kept as unknown fields and ignored.
``DataType`` values are plain ints (see the ``DT_*`` constants).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# tensorflow/core/framework/types.proto (DataType) values used here.
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_INT64, DT_BOOL, DT_HALF = 9, 10, 19

_NP_DTYPES: dict[int, np.dtype] = {
    DT_FLOAT: np.dtype(np.float32),
    DT_DOUBLE: np.dtype(np.float64),
    DT_INT32: np.dtype(np.int32),
    DT_UINT8: np.dtype(np.uint8),
    DT_INT16: np.dtype(np.int16),
    DT_INT8: np.dtype(np.int8),
    DT_INT64: np.dtype(np.int64),
    DT_BOOL: np.dtype(np.bool_),
    DT_HALF: np.dtype(np.float16),
}

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_SCALARS = {
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
    "bool": _F.TYPE_BOOL,
    "bytes": _F.TYPE_BYTES,
    "string": _F.TYPE_STRING,
}

# (message, [(field name, number, label, type or ".tensorflow.Message", oneof index)], oneofs)
_MESSAGES: list[tuple[str, list[tuple[str, int, int, str, int | None]], list[str]]] = [
    (
        "TensorShapeProto",
        [("dim", 2, _REP, ".tensorflow.TensorShapeProto.Dim", None), ("unknown_rank", 3, _OPT, "bool", None)],
        [],
    ),
    ("TensorShapeProto.Dim", [("size", 1, _OPT, "int64", None), ("name", 2, _OPT, "string", None)], []),
    (
        "TensorProto",
        [
            ("dtype", 1, _OPT, "int32", None),  # DataType enum
            ("tensor_shape", 2, _OPT, ".tensorflow.TensorShapeProto", None),
            ("version_number", 3, _OPT, "int32", None),
            ("tensor_content", 4, _OPT, "bytes", None),
            ("float_val", 5, _REP, "float", None),
            ("double_val", 6, _REP, "double", None),
            ("int_val", 7, _REP, "int32", None),
            ("string_val", 8, _REP, "bytes", None),
            ("int64_val", 10, _REP, "int64", None),
            ("bool_val", 11, _REP, "bool", None),
            ("half_val", 13, _REP, "int32", None),
        ],
        [],
    ),
    (
        "AttrValue",
        [
            ("list", 1, _OPT, ".tensorflow.AttrValue.ListValue", 0),
            ("s", 2, _OPT, "bytes", 0),
            ("i", 3, _OPT, "int64", 0),
            ("f", 4, _OPT, "float", 0),
            ("b", 5, _OPT, "bool", 0),
            ("type", 6, _OPT, "int32", 0),  # DataType enum
            ("shape", 7, _OPT, ".tensorflow.TensorShapeProto", 0),
            ("tensor", 8, _OPT, ".tensorflow.TensorProto", 0),
            ("placeholder", 9, _OPT, "string", 0),
        ],
        ["value"],
    ),
    (
        "AttrValue.ListValue",
        [
            ("s", 2, _REP, "bytes", None),
            ("i", 3, _REP, "int64", None),
            ("f", 4, _REP, "float", None),
            ("b", 5, _REP, "bool", None),
            ("type", 6, _REP, "int32", None),  # DataType enum
            ("shape", 7, _REP, ".tensorflow.TensorShapeProto", None),
            ("tensor", 8, _REP, ".tensorflow.TensorProto", None),
        ],
        [],
    ),
    (
        "NodeDef",
        [
            ("name", 1, _OPT, "string", None),
            ("op", 2, _OPT, "string", None),
            ("input", 3, _REP, "string", None),
            ("device", 4, _OPT, "string", None),
            ("attr", 5, _REP, ".tensorflow.NodeDef.AttrEntry", None),
        ],
        [],
    ),
    ("NodeDef.AttrEntry", [("key", 1, _OPT, "string", None), ("value", 2, _OPT, ".tensorflow.AttrValue", None)], []),
    ("GraphDef", [("node", 1, _REP, ".tensorflow.NodeDef", None)], []),
]


def _fill(msg: descriptor_pb2.DescriptorProto, fields: list, oneofs: list[str]) -> None:
    for oneof in oneofs:
        msg.oneof_decl.add(name=oneof)
    for name, number, label, ftype, oneof_index in fields:
        field = msg.field.add(name=name, number=number, label=label)
        if ftype in _SCALARS:
            field.type = _SCALARS[ftype]
        else:
            field.type, field.type_name = _F.TYPE_MESSAGE, ftype
        if oneof_index is not None:
            field.oneof_index = oneof_index


@functools.cache
def messages() -> dict[str, Any]:
    """Message classes keyed by name: GraphDef, NodeDef, AttrValue, ListValue, TensorProto, TensorShapeProto."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="bestshot/tensorflow_graph_subset.proto", package="tensorflow", syntax="proto3"
    )
    top: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full, fields, oneofs in _MESSAGES:
        parent, _, nested = full.partition(".")
        if nested:
            msg = top[parent].nested_type.add(name=nested)
            if nested.endswith("Entry"):
                msg.options.map_entry = True
        else:
            msg = top[parent] = fdp.message_type.add(name=parent)
        _fill(msg, fields, oneofs)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.{name}"))  # noqa: E731
    return {
        "GraphDef": get("GraphDef"),
        "NodeDef": get("NodeDef"),
        "AttrValue": get("AttrValue"),
        "ListValue": get("AttrValue.ListValue"),
        "TensorProto": get("TensorProto"),
        "TensorShapeProto": get("TensorShapeProto"),
    }


def load_graph_def(path: Path) -> Any:
    """Parse a binary frozen GraphDef."""
    graph = messages()["GraphDef"]()
    graph.ParseFromString(Path(path).read_bytes())
    return graph


def shape_to_list(shape: Any) -> list[int] | None:
    """TensorShapeProto -> list of dims (-1 for unknown), or None for unknown rank."""
    return None if shape.unknown_rank else [int(d.size) for d in shape.dim]


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """TensorProto -> numpy array (tensor_content or the typed *_val fields, broadcast as TF does)."""
    dtype = _NP_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise NotImplementedError(f"unsupported TensorProto dtype {tensor.dtype}")
    shape = shape_to_list(tensor.tensor_shape) or []
    size = int(np.prod(shape, dtype=np.int64))
    if tensor.tensor_content:
        return np.frombuffer(tensor.tensor_content, dtype=dtype).reshape(shape).copy()
    if dtype == np.float16:
        vals = np.asarray(tensor.half_val, dtype=np.uint16).view(np.float16)
    else:
        source = {
            np.float32: tensor.float_val,
            np.float64: tensor.double_val,
            np.int64: tensor.int64_val,
            np.bool_: tensor.bool_val,
        }.get(dtype.type, tensor.int_val)
        vals = np.asarray(source, dtype=dtype)
    if vals.size == size:
        return vals.reshape(shape)
    if vals.size == 0:
        return np.zeros(shape, dtype=dtype)
    # Fewer values than elements: TF repeats the last value.
    out = np.full(size, vals[-1], dtype=dtype)
    out[: vals.size] = vals
    return out.reshape(shape)


def attr_value(attr: Any) -> Any:
    """AttrValue -> Python value (bytes decoded to str, tensors to numpy, shapes to lists)."""
    kind = attr.WhichOneof("value")
    if kind is None:
        return None
    value = getattr(attr, kind)
    if kind == "s":
        return value.decode("utf-8", errors="replace")
    if kind == "tensor":
        return tensor_to_numpy(value)
    if kind == "shape":
        return shape_to_list(value)
    if kind == "list":
        for name in ("s", "i", "f", "b", "type", "shape", "tensor"):
            items = getattr(value, name)
            if len(items):
                if name == "s":
                    return [s.decode("utf-8", errors="replace") for s in items]
                if name == "shape":
                    return [shape_to_list(s) for s in items]
                if name == "tensor":
                    return [tensor_to_numpy(t) for t in items]
                return list(items)
        return []
    return value


@dataclass
class TFNode:
    """A GraphDef node with decoded attributes and parsed inputs."""

    name: str
    op: str
    inputs: list[str]  # data inputs as "node" or "node:k" (control inputs "^x" dropped)
    attrs: dict[str, Any]


def parse_nodes(graph: Any) -> dict[str, TFNode]:
    """Graph nodes by name, in GraphDef order."""
    return {
        n.name: TFNode(
            name=n.name,
            op=n.op,
            inputs=[i for i in n.input if not i.startswith("^")],
            attrs={k: attr_value(v) for k, v in n.attr.items()},
        )
        for n in graph.node
    }


def split_input(ref: str) -> tuple[str, int]:
    """'node:1' -> ('node', 1); 'node' -> ('node', 0)."""
    name, _, port = ref.partition(":")
    return name, int(port) if port else 0
