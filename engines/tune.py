"""`bestshot tune`: choose the twin's pruning recipe by evidence, on a tuning split disjoint from the test split.

Tuning split (agent.evaluate.lfw_split): the 65 LFW DevTest people with 2+ images who are in no matched test pair.
Per recipe it measures, on that split only:
- pAUC (30 % discard, FMR 1e-3) of the degraded-probe EDC, with FaceNet and with MobileFaceNet comparison scores
  (each image of a person against the next one, the probe degraded `variants` times);
- the best-shot selection gain on synthetic tracks of those people (utility under MobileFaceNet);
- the cost: the twin branch's multiply-accumulates in the shared-trunk graph over the dense model's (and the same
  with the pruned 2:4 layers at half cost, as sparse tensor cores run them).
The winner is the 2:4 recipe with the best mean rank over the three quality measures (ties: the cheaper one).

The activation criterion (`+act`) ranks each weight by |w| times the RMS of its input channel's activation on
calibration faces (the clean tuning-split crops), read from an ONNX Runtime pass that exposes the layer inputs.
`prepare_activation` writes such a twin into the model cache, where `prepare_fr` then finds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from scipy.stats import rankdata

from agent.cache import locked, read_json, write_json
from agent.evaluate import (
    LFW,
    LIGHTQNET,
    OTHER_MODEL,
    Evaluator,
    Progress,
    lfw_split,
    pair_faces,
    pair_results,
    person_images,
    selection,
    synthetic_tracks,
)
from agent.models import FRSpec, preprocess
from engines.prepare import PreparedFR, build_manifest, prepare_fr, save_onnx
from engines.prune import Recipe, prunable_layers, prune
from engines.twin import TWIN, shared_trunk

log = logging.getLogger(__name__)

RECIPES = (
    "2:4", "2:4@0.5-1", "2:4@0.5-0.75", "2:4@0.625-1", "2:4@0.75-1", "2:4@0.75-0.875", "2:4@0.875-1", "2:4@0.9-1",
    "2:4@0.95-1", "2:4/Bottleneck", "2:4/block8_|Block8", "2:4/block17_(2|4|6|8|10)/|block8_(2|4)/|Block8",
    "2:4@0.5-1/Branch_", "2:4@0.5-1/block\\d+_\\d+/Conv2d_1x1", "2:4+act", "2:4@0.5-1+act", "2:4@0.5-0.75+act",
    "2:4@0.625-1+act", "2:4@0.75-1+act", "2:4@0.875-1+act", "2:4/Bottleneck+act", "unstructured:0.4",
    "unstructured:0.4@0.75-1", "unstructured:0.4+act",
)


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
                 and twin.is_file() and pair.is_file())
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


def _ranks(values: list[float], higher_better: bool) -> np.ndarray:
    v = np.nan_to_num(np.asarray(values, np.float64), nan=np.inf if not higher_better else -np.inf)
    return rankdata(-v if higher_better else v)


def tune(out: Path, recipes: Sequence[str] = RECIPES, lfw: Path = LFW, other_model: Path = OTHER_MODEL,
         lightqnet: Path = LIGHTQNET, seed: int = 0, variants: int = 3, frames: int = 12, limit: int | None = None,
         threads: int | None = None, cache: Path | None = None) -> dict:
    """Measure every recipe on the tuning split, pick the winner among the 2:4 ones, write tune.json and tune.md
    under `out` (the cheap baselines on the same split are reported beside them). `limit`: at most that many
    tuning people (a quick run)."""
    t0 = time.monotonic()
    ev = Evaluator(lfw, other_model, lightqnet, threads, cache)
    people = lfw_split(ev.lfw)[1][:limit]
    pairs = []
    for p in people:
        imgs = person_images(ev.lfw, p)
        pairs += [(imgs[i], imgs[(i + 1) % len(imgs)]) for i in range(len(imgs))]
    faces, sets = pair_faces(ev, pairs, seed, variants, "tuning pair faces")
    deg = [s for s in sets if s.name == "degraded"]
    ts = synthetic_tracks(ev, people, seed, frames, "tuning tracks")

    def measure(name: str, q_pairs: np.ndarray, q_tracks: np.ndarray, recipe: str) -> dict:
        res = pair_results(ev, faces, deg, {name: q_pairs}, recipe, fmrs=(1e-3,))["degraded"]
        sel = selection(ts, q_tracks)
        return {f"pauc_{m}": e["fmr"]["0.001"]["methods"][name]["pauc"] for m, e in res.items()} | {
            "track_gain": sel["gain"], "track_spearman": sel["spearman"]}

    rows: dict[str, dict] = {}
    for r in recipes:
        t1 = time.monotonic()
        recipe = Recipe.parse(r)
        row = measure(r, ev.prefiqs(faces, r), ev.prefiqs(ts.faces, r), r)
        prepared = ev.prepared(r)
        cost = twin_cost(onnx.load(str(prepared.pair)), recipe.kind == "2:4")
        row["twin_macs"], row["twin_macs_sparse"] = (round(v, 4) for v in cost)
        row["layers_pruned"] = prepared.manifest["layers_pruned"]
        row["seconds"] = round(time.monotonic() - t1, 1)
        rows[r] = row
        log.info("recipe %s: %s", r, row)
    first = recipes[0]
    base_pairs = ev.methods(faces, [], seed, fusion=False)
    base_tracks = ev.methods(ts.faces, [], seed, fusion=False)
    baselines = {n: measure(n, base_pairs[n], base_tracks[n], first) for n in base_pairs}
    baselines["oracle"] = {"track_gain": 1.0}

    metrics = [k for k in next(iter(rows.values())) if k.startswith("pauc_")] + ["track_gain"]
    names = list(rows)
    rank = np.mean([_ranks([rows[n][m] for n in names], m == "track_gain") for m in metrics], axis=0)
    for n, rk in zip(names, rank, strict=True):
        rows[n]["mean_rank"] = round(float(rk), 2)
    eligible = [n for n in names if Recipe.parse(n).kind == "2:4"]
    winner = min(eligible, key=lambda n: (rows[n]["mean_rank"], rows[n]["twin_macs"])) if eligible else None
    res = {"config": {"recipes": list(recipes), "seed": seed, "people": len(people), "genuine": int(len(deg[0].ref)),
                      "tracks": len(ts.tracks), "frames": frames, "variants": variants,
                      "selection": f"mean rank over {metrics} among 2:4 recipes; ties: fewer twin MACs"},
           "recipes": rows, "baselines": baselines, "winner": winner, "seconds": round(time.monotonic() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "tune.md").write_text(tune_markdown(res, metrics) + "\n")
    log.info("tune: winner %s; wrote %s/tune.json and tune.md", winner, out)
    return res


def tune_markdown(res: dict, metrics: list[str]) -> str:
    cols = metrics + ["track_spearman", "twin_macs", "twin_macs_sparse", "layers_pruned", "mean_rank"]
    labels = {"track_gain": "track gain", "track_spearman": "Spearman in track", "twin_macs": "twin MACs / dense",
              "twin_macs_sparse": "same, 2:4 kernels", "layers_pruned": "layers pruned", "mean_rank": "mean rank"}
    head = [labels.get(c, f"pAUC {c.removeprefix('pauc_')}") for c in cols]
    lines = ["| recipe | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(cols)]
    for n, r in sorted(res["recipes"].items(), key=lambda kv: kv[1]["mean_rank"]):
        mark = " **(chosen)**" if n == res["winner"] else ""
        name = n.replace("|", "\\|")  # a regex alternation would split the table cell
        lines.append(f"| `{name}`{mark} | " + " | ".join(f"{r.get(c, '')}" for c in cols) + " |")
    for n, r in res["baselines"].items():
        lines.append(f"| {n} (baseline) | " + " | ".join(f"{r.get(c, '')}" for c in cols) + " |")
    return "\n".join(lines)
