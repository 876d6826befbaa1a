"""The shared-trunk pair split at the branch point, for runtimes that run two graphs on one device buffer.

From `pair.onnx` (engines/twin.py), two graphs:
- `split-dense.onnx`: the dense model with, besides its outputs (embedding, activation statistics), the
  trunk tensors where the pruned branch starts (for `2:4/Bottleneck`: the 1792-wide input of the bottleneck
  product; for deeper recipes every trunk tensor the branch reads, e.g. a residual's shortcut);
- `split-branch.onnx`: the branch alone (the twin's nodes, from those tensors to the twin embedding).
Running the branch on the dense graph's extra outputs gives exactly the pair's twin embedding (tested for every
shipped recipe and an ArcFace-style model). TensorRT builds the dense engine and the 2:4-sparse branch engine
from these (engines/trt_build.py); both files are written once per recipe, beside pair.onnx.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.common.cache import atomic_write, locked, read_json, sha256_file, write_json
from engines.recipe import TWIN

if TYPE_CHECKING:  # imported where the split is built: the agent's start does not pay for onnx
    import onnx

log = logging.getLogger(__name__)

SPLIT_VERSION = 1  # bump when the split graphs change


@dataclass(frozen=True)
class Split:
    dense: Path
    branch: Path
    branch_inputs: list[str]  # the split point: trunk tensors the branch reads (extra outputs of the dense graph)
    branch_output: str
    sparse_layers: list[str]  # the branch's nodes whose weights are pruned (2:4 candidates for sparse kernels)


def _is_branch(node: onnx.NodeProto, branch_out: set[str]) -> bool:
    return node.name.startswith(TWIN) or any(i in branch_out for i in node.input)


def split_models(pair: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str], list[str]]:
    """(dense with the branch-start outputs, the branch, the branch-start tensor names, the pruned branch nodes)."""
    import onnx

    g = pair.graph
    inits = {t.name for t in g.initializer}
    branch_nodes, dense_nodes, branch_out = [], [], set()
    for node in g.node:  # topological order: a node is in the branch if it is a twin copy or reads the branch
        if _is_branch(node, branch_out):
            branch_nodes.append(node)
            branch_out.update(o for o in node.output if o)
        else:
            dense_nodes.append(node)
    if not branch_nodes:
        raise ValueError("the pair has no twin branch")
    starts: list[str] = []
    for node in branch_nodes:
        for i in node.input:
            if i and i not in branch_out and i not in inits and i not in starts:
                starts.append(i)
    graph_inputs = {i.name for i in g.input}
    if not starts or any(s in graph_inputs for s in starts):
        raise ValueError(f"the branch starts at the model input ({starts}): nothing to split")
    twin_out = [o for o in g.output if o.name in branch_out]
    if len(twin_out) != 1:
        raise ValueError(f"the pair needs exactly one twin output, has {[o.name for o in twin_out]}")
    inferred = onnx.shape_inference.infer_shapes(pair).graph
    info = {v.name: v for v in [*inferred.value_info, *inferred.output]}
    missing = [s for s in starts if s not in info]
    if missing:
        raise ValueError(f"shape inference gave no type for the branch inputs {missing}")
    batch = g.input[0].type.tensor_type.shape.dim[0]
    start_info = []
    for s in starts:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(info[s])
        vi.type.tensor_type.shape.dim[0].CopyFrom(batch)  # the same symbolic batch as the model input
        start_info.append(vi)

    def used(nodes: list[onnx.NodeProto]) -> list[onnx.TensorProto]:
        names = {i for n in nodes for i in n.input}
        return [t for t in g.initializer if t.name in names]

    dense = onnx.helper.make_model(
        onnx.helper.make_graph(dense_nodes, g.name, list(g.input),
                               [o for o in g.output if o.name not in branch_out] + start_info, used(dense_nodes)),
        opset_imports=list(pair.opset_import), ir_version=pair.ir_version)
    branch = onnx.helper.make_model(
        onnx.helper.make_graph(branch_nodes, g.name + "-branch", start_info, twin_out, used(branch_nodes)),
        opset_imports=list(pair.opset_import), ir_version=pair.ir_version)
    for m in (dense, branch):
        onnx.checker.check_model(m)
    sparse = [n.name for n in branch_nodes if n.op_type in ("Conv", "Gemm", "MatMul")
              and any(i.startswith(TWIN) and i in inits for i in n.input)]
    return dense, branch, starts, sparse


def split_pair(pair_path: Path) -> Split:
    """Write (or reuse) the split graphs of `pair_path` beside it."""
    dense_path, branch_path = pair_path.with_name("split-dense.onnx"), pair_path.with_name("split-branch.onnx")
    mpath = pair_path.with_name("split.json")
    with locked(branch_path):
        man = read_json(mpath)
        sha = sha256_file(pair_path)
        if not (man and man.get("pair_sha256") == sha and man.get("version") == SPLIT_VERSION
                and dense_path.is_file() and branch_path.is_file()):
            import onnx

            dense, branch, starts, sparse = split_models(onnx.load(str(pair_path)))
            atomic_write(dense_path, lambda p: onnx.save(dense, str(p)))
            atomic_write(branch_path, lambda p: onnx.save(branch, str(p)))
            man = {"version": SPLIT_VERSION, "pair_sha256": sha, "branch_inputs": starts,
                   "branch_output": branch.graph.output[0].name, "sparse_layers": sparse,
                   "branch_nodes": len(branch.graph.node), "dense_nodes": len(dense.graph.node)}
            write_json(mpath, man)
            log.info("split %s at %s: branch of %d nodes (%d pruned)", pair_path, starts, len(branch.graph.node),
                     len(sparse))
    return Split(dense_path, branch_path, man["branch_inputs"], man["branch_output"], man["sparse_layers"])
