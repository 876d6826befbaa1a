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
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

_RECIPE_RE = re.compile(
    r"^(?P<kind>2:4|unstructured)(?::(?P<ratio>[0-9.]+))?(?:@(?P<lo>[0-9.]+)-(?P<hi>[0-9.]+))?"
    r"(?:/(?P<pattern>.+))?$"
)


@dataclass(frozen=True)
class Recipe:
    """Which layers to prune and how. Written as text: `KIND[:RATIO][@LO-HI][/REGEX]`.

    Examples: `2:4@0.75-1` (2:4 on the deepest quarter of eligible layers), `unstructured:0.4`
    (global magnitude pruning of 40 % of all eligible weights), `2:4/Block8` (layers whose name
    matches the regex). `criterion` "magnitude" ranks by |w|; "activation" by |w| times the input
    channel's activation norm on calibration faces (needs `channel_scale` when pruning).
    """

    kind: str = "2:4"
    ratio: float = 0.5
    depth: tuple[float, float] = (0.0, 1.0)
    pattern: str | None = None
    criterion: str = "magnitude"
    per_layer: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def parse(cls, text: str) -> Recipe:
        text = text.strip()
        criterion = "magnitude"
        if text.endswith("+act"):
            text, criterion = text[: -len("+act")], "activation"
        m = _RECIPE_RE.match(text)
        if not m:
            raise ValueError(
                f"bad pruning recipe {text!r}: expected KIND[:RATIO][@LO-HI][/REGEX][+act], "
                "e.g. '2:4@0.75-1' or 'unstructured:0.4'"
            )
        kind = m["kind"]
        if kind == "2:4" and m["ratio"]:
            raise ValueError(f"bad pruning recipe {text!r}: 2:4 prunes exactly half of each group, no ratio")
        ratio = float(m["ratio"]) if m["ratio"] else (0.5 if kind == "2:4" else 0.4)
        lo = float(m["lo"]) if m["lo"] else 0.0
        hi = float(m["hi"]) if m["hi"] else 1.0
        if not (0.0 <= ratio < 1.0) or not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"bad pruning recipe {text!r}: need 0 <= ratio < 1 and 0 <= LO < HI <= 1")
        if m["pattern"]:
            try:
                re.compile(m["pattern"])
            except re.error as e:
                raise ValueError(f"bad pruning recipe {text!r}: layer pattern {m['pattern']!r}: {e}") from None
        return cls(kind=kind, ratio=ratio, depth=(lo, hi), pattern=m["pattern"], criterion=criterion)

    def __str__(self) -> str:
        s = self.kind if self.kind == "2:4" else f"{self.kind}:{self.ratio:g}"
        if self.depth != (0.0, 1.0):
            s += f"@{self.depth[0]:g}-{self.depth[1]:g}"
        if self.pattern:
            s += f"/{self.pattern}"
        if self.criterion == "activation":
            s += "+act"
        return s

    @property
    def slug(self) -> str:
        """The recipe as a file-name-safe string."""
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(self))


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
