"""`bestshot tune`: choose the twin's pruning recipe by evidence, on a tuning split disjoint from the test split.

Tuning split (agent.quality.evaluate.lfw_split): the 65 LFW DevTest people with 2+ images who are in no matched
test pair.
Per recipe it measures, on that split only:
- pAUC (30 % discard, FMR 1e-3) of the degraded-probe EDC, with FaceNet and with MobileFaceNet comparison scores
  (each image of a person against the next one, the probe degraded `variants` times);
- the best-shot selection gain on synthetic tracks of those people (utility under MobileFaceNet);
- the cost: the twin branch's multiply-accumulates in the shared-trunk graph over the dense model's (and the same
  with the pruned 2:4 layers at half cost, as sparse tensor cores run them).
The winner is the 2:4 recipe with the best mean rank over the three quality measures (ties: the cheaper one).

The activation criterion (`+act`, engines/activation.py) is calibrated on the clean tuning-split crops.

`bestshot tune --selection` fits the selection score (agent/quality/selection.py) on the same split: the cue weights
by pairwise logistic regression over the tuning tracks' frames, with and without the activation statistics, each
validated leaving one degradation kind out (fitted without that kind's frames, measured on them); then the
probability map on the degraded tuning pairs (a match: FaceNet score at or above the FMR 1e-3 threshold of the
tuning impostors).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from scipy.stats import rankdata, spearmanr

from agent.pipeline.detect import DetectorSpec
from agent.quality.edc import threshold_at_fmr
from agent.quality.evaluate import (
    LFW,
    LIGHTQNET,
    OTHER_MODEL,
    Evaluator,
    lfw_split,
    pair_faces,
    pair_results,
    person_images,
    selection,
    synthetic_tracks,
)
from agent.quality.selection import WEIGHTS, WEIGHTS_NO_STATS, fit_probability, fit_weights
from engines.prepare import default_recipe
from engines.recipe import Recipe
from engines.twin import twin_cost

log = logging.getLogger(__name__)

RECIPES = (
    "2:4", "2:4@0.5-1", "2:4@0.5-0.75", "2:4@0.625-1", "2:4@0.75-1", "2:4@0.75-0.875", "2:4@0.875-1", "2:4@0.9-1",
    "2:4@0.95-1", "2:4/Bottleneck", "2:4/block8_|Block8", "2:4/block17_(2|4|6|8|10)/|block8_(2|4)/|Block8",
    "2:4@0.5-1/Branch_", "2:4@0.5-1/block\\d+_\\d+/Conv2d_1x1", "2:4+act", "2:4@0.5-1+act", "2:4@0.5-0.75+act",
    "2:4@0.625-1+act", "2:4@0.75-1+act", "2:4@0.875-1+act", "2:4/Bottleneck+act", "unstructured:0.4",
    "unstructured:0.4@0.75-1", "unstructured:0.4+act",
)


def _ranks(values: list[float], higher_better: bool) -> np.ndarray:
    v = np.nan_to_num(np.asarray(values, np.float64), nan=np.inf if not higher_better else -np.inf)
    return rankdata(-v if higher_better else v)


def tune(out: Path, recipes: Sequence[str] = RECIPES, lfw: Path = LFW, other_model: Path = OTHER_MODEL,
         lightqnet: Path = LIGHTQNET, seed: int = 0, variants: int = 3, frames: int = 12, limit: int | None = None,
         threads: int | None = None, cache: Path | None = None, detector: DetectorSpec | None = None) -> dict:
    """Measure every recipe on the tuning split, pick the winner among the 2:4 ones, write tune.json and tune.md
    under `out` (the cheap baselines on the same split are reported beside them). `limit`: at most that many
    tuning people (a quick run)."""
    t0 = time.monotonic()
    ev = Evaluator(lfw, other_model, lightqnet, threads, cache, detector=detector)
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


def tune_selection(out: Path, lfw: Path = LFW, other_model: Path = OTHER_MODEL, lightqnet: Path = LIGHTQNET,
                   seed: int = 0, variants: int = 3, frames: int = 12, recipe: str | None = None,
                   threads: int | None = None, cache: Path | None = None, detector: DetectorSpec | None = None
                   ) -> dict:
    """Fit the selection score's weights and probability map on the tuning split; write tune-selection.json/.md.
    `detector`: whose crops and confidences the weights are fitted on (default: CenterFace, the shipped fit)."""
    t0 = time.monotonic()
    ev = Evaluator(lfw, other_model, lightqnet, threads, cache, detector=detector)
    recipe = recipe or str(default_recipe(ev.spec))
    people = lfw_split(ev.lfw)[1]
    pairs = []
    for p in people:
        imgs = person_images(ev.lfw, p)
        pairs += [(imgs[i], imgs[(i + 1) % len(imgs)]) for i in range(len(imgs))]
    faces, sets = pair_faces(ev, pairs, seed, variants, "tuning pair faces")
    deg = next(s for s in sets if s.name == "degraded")
    ts = synthetic_tracks(ev, people, seed, frames, "tuning tracks")
    cues_t, cues_p = ev.cues(ts.faces, recipe), ev.cues(faces, recipe)
    genuine, impostor = deg.scores(ev.dense(faces, recipe), np.array(faces.ids))
    matched = genuine >= threshold_at_fmr(impostor, 1e-3)
    res: dict = {"config": {"recipe": recipe, "detector": ev.det.kind, "seed": seed, "people": len(people),
                            "tracks": len(ts.tracks),
                            "frames": frames, "genuine": len(genuine), "matched": int(matched.sum())}}
    for form, keys in (("full", list(WEIGHTS)), ("no_stats", list(WEIGHTS_NO_STATS))):
        z = np.stack([cues_t[k] for k in keys], 1)
        w = fit_weights(z, ts.tracks, ts.utility)
        s_pairs = np.stack([cues_p[k] for k in keys], 1) @ w
        slope, icpt = fit_probability(np.minimum(s_pairs[deg.ref], s_pairs[deg.probe]), matched)
        loko = {}
        for kind in sorted(set(ts.kinds)):
            held = ts.kinds == kind
            wk = fit_weights(z, [t[~held[t]] for t in ts.tracks], ts.utility)
            loko[kind] = {"spearman_held_out": round(float(spearmanr(z[held] @ wk, ts.utility[held]).statistic), 4),
                          "spearman_fitted_on_all": round(float(spearmanr(z[held] @ w, ts.utility[held]).statistic),
                                                          4)}
        res[form] = {"weights": {k: round(float(v), 4) for k, v in zip(keys, w, strict=True)},
                     "probability": [round(slope, 4), round(icpt, 4)],
                     "track_gain": selection(ts, z @ w)["gain"], "leave_one_kind_out": loko}
        log.info("selection %s: %s", form, res[form])
    res["seconds"] = round(time.monotonic() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune-selection.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["| form | weights | probability (slope, intercept) | tuning track gain |", "| --- | --- | --- | ---: |"]
    lines += [f"| {f} | {res[f]['weights']} | {res[f]['probability']} | {res[f]['track_gain']} |"
              for f in ("full", "no_stats")]
    kinds = list(res["full"]["leave_one_kind_out"])
    lines += ["", "| kind held out | Spearman, fitted without it | fitted on all |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {res['full']['leave_one_kind_out'][k]['spearman_held_out']} | "
              f"{res['full']['leave_one_kind_out'][k]['spearman_fitted_on_all']} |" for k in kinds]
    (out / "tune-selection.md").write_text("\n".join(lines) + "\n")
    log.info("tune --selection: wrote %s/tune-selection.json and .md", out)
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
