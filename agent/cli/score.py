"""`bestshot score` and `bestshot models`: still images in, one JSON line per face out."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np

from agent.common.images import ImageError, expand_paths, read_image
from agent.pipeline.align import align
from agent.pipeline.detect import Detector
from agent.pipeline.score import Scorer
from agent.types import Detection

log = logging.getLogger(__name__)


@dataclass
class ScoreStats:
    images: int = 0
    faces: int = 0
    failed: int = 0


def _round(a: np.ndarray) -> list:
    return np.round(a.astype(float), 1).tolist()


def _face_record(path: Path, i: int, det: Detection | None, s, with_embedding: bool) -> dict:
    rec = {
        "image": str(path),
        "face": i,
        "bbox": None if det is None else [round(float(v), 1) for v in det.bbox],
        "landmarks": None if det is None or det.landmarks is None else _round(det.landmarks),
        "det_score": None if det is None else round(float(det.score), 4),
        "quality": round(s.quality, 5),
        "prefiqs": round(s.prefiqs, 5),
        "drift": round(s.drift, 5),
    }
    if s.cues:
        rec["cues"] = {k: round(v, 5) for k, v in s.cues.items()}
    if with_embedding:
        rec["embedding"] = [round(float(v), 6) for v in s.embedding]
    return rec


def score_paths(
    paths: list[str],
    scorer: Scorer,
    detector: Detector | None,
    out: TextIO,
    as_json: bool = True,
    with_embedding: bool = False,
    ers=None,
) -> ScoreStats:
    """Score every face of every image; errors go to the log (stderr), one line per bad file."""
    stats = ScoreStats()
    for path in expand_paths(paths):
        try:
            image = read_image(path)
        except ImageError as e:
            log.error("%s", e)
            stats.failed += 1
            continue
        stats.images += 1
        if detector is None:  # --aligned: the image is the crop
            dets: list[Detection | None] = [None]
            size = scorer.spec.input_size
            crops = [cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)]
        else:
            dets = list(detector.detect(image))
            crops = [align(image, d, scorer.spec) for d in dets]
        if not crops:
            log.info("%s: no face found", path)
            continue
        scored = scorer.score(crops, [d.score if d else float("nan") for d in dets],
                              [d.size if d else float("nan") for d in dets])
        for i, (det, s) in enumerate(zip(dets, scored, strict=True)):
            rec = _face_record(path, i, det, s, with_embedding)
            if ers is not None:
                rec["ers"] = round(ers.score(s.embedding), 4)
            if as_json:
                out.write(json.dumps(rec) + "\n")
            else:
                box = "" if det is None else " box=" + ",".join(f"{v:.0f}" for v in det.bbox)
                out.write(f"{path} face {i}{box} quality={s.quality:.4f} prefiqs={s.prefiqs:.4f} drift={s.drift:.4f}\n")
            stats.faces += 1
        out.flush()
    return stats


def models_report(prepared, detector_path: Path | None) -> dict:
    """What `bestshot models` shows: each model file, its sha256, input spec, recipe and sparsity, and the ERS
    calibration saved beside it (None until the first run or `bestshot ers calibrate`), and the selection score's."""
    from agent.common.cache import sha256_file
    from agent.quality.ers import ers_path, load_ers
    from agent.quality.selection import selection_path

    spec, man = prepared.spec, prepared.manifest
    sparsity = man.get("sparsity", {})
    zeros = sum(sparsity.values()) / max(1, len(sparsity))
    fr = {
        "name": spec.name,
        "input": {"size": spec.input_size, "color": spec.color, "layout": spec.layout,
                  "normalize": spec.normalize, "margin": spec.margin},
        "recipe": man["recipe"],
        "layers_pruned": man["layers_pruned"],
        "layers_eligible_2_4": man["layers_eligible"],
        "mean_sparsity_of_pruned_layers": round(zeros, 4),
        "pattern_2_4_verified": man["pattern_2_4_verified"],
        "files": {
            "dense": {"path": str(prepared.dense), "sha256": man["dense_sha256"]},
            "twin": {"path": str(prepared.twin), "sha256": man["twin_sha256"]},
            "pair": {"path": str(prepared.pair), "sha256": man["pair_sha256"]},
        },
        "source_sha256": man["source_sha256"],
    }
    ers = load_ers(prepared)
    fr["ers"] = None if ers is None else {"source": ers.info.get("source"), "threshold": round(ers.threshold, 4),
                                          "path": str(ers_path(prepared))}
    sel = selection_path(prepared)
    fr["selection"] = {"path": str(sel), "activation_stats": man.get("activation_stats")} if sel.is_file() else None
    out = {"fr": fr}
    if detector_path is not None:
        out["detector"] = {"path": str(detector_path), "sha256": sha256_file(detector_path)}
    return out


def print_models(report: dict, out: TextIO = sys.stdout) -> None:
    fr = report["fr"]
    out.write(f"FR model {fr['name']}: input {fr['input']}\n")
    out.write(
        f"  recipe {fr['recipe']}: layers pruned {fr['layers_pruned']} "
        f"(of {fr['layers_eligible_2_4']} that can carry 2:4), "
        f"mean sparsity {fr['mean_sparsity_of_pruned_layers']:.3f}, 2:4 verified {fr['pattern_2_4_verified']}\n"
    )
    for kind, f in fr["files"].items():
        out.write(f"  {kind:6s} {f['path']}  sha256 {f['sha256'][:16]}\n")
    ers = fr["ers"]
    out.write(f"  ERS    {ers['path']}  {ers['source']} calibration, threshold {ers['threshold']}\n" if ers
              else "  ERS    not calibrated yet (built at the first run, or `bestshot ers calibrate`)\n")
    sel = fr.get("selection")
    out.write(f"  selection calibration {sel['path']} (activation statistics at depths {sel['activation_stats']})\n"
              if sel else "  selection score not calibrated yet (built at the first run)\n")
    if "detector" in report:
        d = report["detector"]
        out.write(f"detector {d['path']}  sha256 {d['sha256'][:16]}\n")
