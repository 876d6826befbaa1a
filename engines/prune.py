"""Weight pruning of an ONNX FR model into its PreFIQs twin.

Two families:
- 2:4 structured: in every group of 4 consecutive weights along the input-channel (reduction)
  axis, the 2 of least importance are zeroed. That is the layout sparse tensor cores (and TensorRT's
  sparse kernels) need: for a Conv weight [O, C, kh, kw] the groups run along C for each (o, kh, kw);
  for a MatMul weight [K, N] along K; for a Gemm with transB=1 ([N, K]) along K.
- unstructured: global magnitude pruning of a fraction rho of the selected weights (the PreFIQs
  paper's reference, L1 at rho = 0.4), or one ratio per layer.

Layers are selected by a recipe: all eligible layers, a name pattern, and/or a depth range over the
eligible layers in graph order (0.75-1.0 = the deepest quarter).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from engines.recipe import Recipe

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Prunable:
    """A weight tensor of a Conv, Gemm or MatMul node, with the axis its reduction runs along."""

    node: str
    op: str
    weight: str  # initializer name
    axis: int  # the input-channel (reduction) axis of the weight
    shape: tuple[int, ...]
    supports_24: bool  # the reduction axis length is a multiple of 4 (and the conv is not grouped)


def prunable_layers(model: onnx.ModelProto) -> list[Prunable]:
    """Every Conv/Gemm/MatMul node whose weight is an initializer, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    out: list[Prunable] = []
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            shape = tuple(inits[node.input[1]].dims)
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            ok = group == 1 and shape[1] % 4 == 0
            out.append(Prunable(node.name, "Conv", node.input[1], 1, shape, ok))
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            shape = tuple(inits[node.input[1]].dims)
            if len(shape) != 2:
                continue
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 1 if (node.op_type == "Gemm" and trans_b) else 0
            out.append(Prunable(node.name, node.op_type, node.input[1], axis, shape, shape[axis] % 4 == 0))
    return out


def select_layers(layers: list[Prunable], recipe: Recipe) -> list[Prunable]:
    """The layers a recipe prunes: eligible ones, filtered by pattern, then cut to the depth range."""
    eligible = [p for p in layers if p.supports_24 or recipe.kind != "2:4"]
    skipped = len(layers) - len(eligible)
    if skipped:
        log.debug("%d layer(s) cannot carry 2:4 (reduction axis not a multiple of 4, or grouped)", skipped)
    if recipe.pattern:
        rx = re.compile(recipe.pattern)
        eligible = [p for p in eligible if rx.search(p.node) or rx.search(p.weight)]
    n = len(eligible)
    lo, hi = int(round(recipe.depth[0] * n)), int(round(recipe.depth[1] * n))
    return eligible[lo:hi]


def mask_24(w: np.ndarray, axis: int, importance: np.ndarray | None = None) -> np.ndarray:
    """Boolean keep-mask with exactly 2 of every 4 consecutive weights along `axis` kept.

    `importance` (same shape as w) defaults to |w|; ties keep the earlier weight.
    """
    imp = np.abs(w) if importance is None else importance
    moved = np.moveaxis(imp, axis, -1)
    groups = moved.reshape(-1, 4)
    order = np.argsort(groups, axis=1, kind="stable")  # ascending: the 2 first are dropped
    keep = np.ones_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :2], False, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def is_24(w: np.ndarray, axis: int) -> bool:
    """True if every group of 4 consecutive weights along `axis` holds at least 2 zeros."""
    groups = np.moveaxis(w, axis, -1).reshape(-1, 4)
    return bool(((groups == 0).sum(axis=1) >= 2).all())


@dataclass
class PruneResult:
    model: onnx.ModelProto
    pruned: dict[str, float]  # initializer name -> fraction of zeros after pruning


def prune(
    model: onnx.ModelProto,
    recipe: Recipe,
    channel_scale: dict[str, np.ndarray] | None = None,
) -> PruneResult:
    """Return a copy of `model` with the recipe's layers pruned.

    channel_scale: for the "activation" criterion, per prunable weight name, the L2 norm of each
    input channel's activation on calibration data (1-D, length of the reduction axis).
    """
    layers = select_layers(prunable_layers(model), recipe)
    if not layers:
        raise ValueError(f"recipe {recipe} selects no prunable layer in this model")
    if recipe.criterion == "activation" and not channel_scale:
        raise ValueError("the activation criterion needs per-channel activation norms (calibration faces)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    weights = {p.weight: numpy_helper.to_array(inits[p.weight]).astype(np.float32) for p in layers}

    def importance(p: Prunable) -> np.ndarray:
        w = np.abs(weights[p.weight])
        if recipe.criterion == "activation":
            shape = [1] * w.ndim
            shape[p.axis] = -1
            w = w * channel_scale[p.weight].reshape(shape)
        return w

    masks: dict[str, np.ndarray] = {}
    if recipe.kind == "2:4":
        for p in layers:
            masks[p.weight] = mask_24(weights[p.weight], p.axis, importance(p))
    elif recipe.per_layer:
        for p in layers:
            rho = recipe.per_layer.get(p.node, recipe.per_layer.get(p.weight, recipe.ratio))
            imp = importance(p)
            masks[p.weight] = imp > np.quantile(imp, rho) if rho > 0 else np.ones_like(imp, bool)
    else:
        # Global magnitude pruning: one threshold over all selected weights.
        all_imp = np.concatenate([importance(p).ravel() for p in layers])
        k = int(recipe.ratio * all_imp.size)
        thr = np.partition(all_imp, k)[k] if k > 0 else -np.inf
        for p in layers:
            masks[p.weight] = importance(p) >= thr

    pruned: dict[str, float] = {}
    for p in layers:
        w = np.where(masks[p.weight], weights[p.weight], 0.0).astype(np.float32)
        inits[p.weight].CopyFrom(numpy_helper.from_array(w, p.weight))
        pruned[p.weight] = float((w == 0).mean())
    total = sum(int(np.prod(p.shape)) for p in layers)
    zeros = sum(pruned[p.weight] * int(np.prod(p.shape)) for p in layers)
    log.info("recipe %s: %d layers pruned, %.1f %% of their weights zero", recipe, len(layers), 100 * zeros / total)
    return PruneResult(out, pruned)
