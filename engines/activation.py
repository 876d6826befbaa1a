"""The activation criterion (`+act` recipes): each weight ranked by |w| times the RMS of its input channel's
activation on calibration faces, read from an ONNX Runtime pass that exposes the layer inputs.
`prepare_activation` writes such a twin into the model cache, where `prepare_fr` then finds it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from agent.common.cache import locked, read_json, write_json
from agent.common.fr_spec import FRSpec, preprocess
from agent.common.progress import Progress
from engines.prepare import PreparedFR, build_manifest, prepare_fr, save_onnx
from engines.prune import prunable_layers, prune
from engines.recipe import STAT_DEPTHS, Recipe
from engines.twin import shared_trunk

log = logging.getLogger(__name__)


def activation_norms(dense: onnx.ModelProto, batches: Sequence[np.ndarray], threads: int | None = None
                     ) -> dict[str, np.ndarray]:
    """Per prunable weight, the RMS of each input channel of its layer's input over the calibration batches."""
    import onnxruntime as ort

    nodes = {n.name: n for n in dense.graph.node}
    axes: dict[str, tuple[str, int]] = {}  # weight -> (input tensor, channel axis)
    for p in prunable_layers(dense):
        n = nodes[p.node]
        trans_a = any(a.name == "transA" and a.i for a in n.attribute)
        axes[p.weight] = (n.input[0], 1 if p.op == "Conv" else (0 if trans_a else -1) if p.op == "Gemm" else -1)
    m = onnx.ModelProto()
    m.CopyFrom(dense)
    taps = sorted({t for t, _ in axes.values()})
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in taps if t not in known)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads or 0, 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sums: dict[tuple[str, int], np.ndarray] = {}
    counts: dict[tuple[str, int], int] = {}
    bar = Progress("activation norms", len(batches))
    for x in batches:
        out = dict(zip(taps, sess.run(taps, {sess.get_inputs()[0].name: x}), strict=True))
        for key in set(axes.values()):
            v = np.moveaxis(out[key[0]].astype(np.float64), key[1], -1)
            v = v.reshape(-1, v.shape[-1])
            sums[key] = sums.get(key, 0.0) + (v**2).sum(0)
            counts[key] = counts.get(key, 0) + len(v)
        bar()
    bar.close()
    return {w: np.sqrt(sums[k] / counts[k]).astype(np.float32) for w, k in axes.items()}


_NORMS: dict[tuple[str, str], dict[str, np.ndarray]] = {}  # (dense sha, calibration digest) -> norms, per process


def prepare_activation(spec: FRSpec, recipe: Recipe, crops: np.ndarray, root: Path | None = None,
                       threads: int | None = None) -> PreparedFR:
    """Prepare (or reuse) the twin of an activation-criterion recipe, calibrated on `crops` (aligned BGR uint8),
    in the cache layout of engines.prepare; the manifest records the calibration faces' digest, and
    channel_scale.npz beside it the norms of the pruned layers (what `prune` needs to rebuild the twin)."""
    mag = prepare_fr(spec, replace(recipe, criterion="magnitude"), root)
    rdir = mag.dir.parent / recipe.slug
    twin, pair = rdir / "twin.onnx", rdir / "pair.onnx"
    digest = hashlib.sha256(np.ascontiguousarray(crops).tobytes()).hexdigest()
    with locked(twin):
        manifest = read_json(rdir / "manifest.json")
        fresh = (manifest and manifest.get("dense_sha256") == mag.manifest["dense_sha256"]
                 and manifest.get("recipe") == str(recipe) and manifest.get("calibration", {}).get("sha256") == digest
                 and manifest.get("activation_stats") == list(STAT_DEPTHS) and twin.is_file() and pair.is_file())
        if not fresh:
            log.info("pruning %s with recipe %s, calibrated on %d faces", spec.name, recipe, len(crops))
            rdir.mkdir(parents=True, exist_ok=True)
            dense = onnx.load(str(mag.dense))
            key = (mag.manifest["dense_sha256"], digest)
            if key not in _NORMS:
                batches = [preprocess(list(crops[i : i + 16]), spec) for i in range(0, len(crops), 16)]
                _NORMS[key] = activation_norms(dense, batches, threads)
            result = prune(dense, recipe, _NORMS[key])
            np.savez(rdir / "channel_scale.npz", **{w: _NORMS[key][w] for w in result.pruned})  # to ship them
            save_onnx(result.model, twin)
            save_onnx(shared_trunk(dense, result.model), pair)
            manifest = build_manifest(spec, recipe, mag.manifest, result.model, result.pruned, twin, pair)
            manifest["calibration"] = {"faces": len(crops), "sha256": digest}
            write_json(rdir / "manifest.json", manifest)
    return PreparedFR(spec, recipe, mag.dense, twin, pair, manifest, rdir)
