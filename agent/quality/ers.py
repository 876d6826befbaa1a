"""ERS, the embedding recognisability score (Deng et al., "Harnessing Unrecognizable Faces for Improving Face
Recognition"), calibrated for the configured FR model, and track templates weighted by it.

The unrecognisable-identity centroid (UIC) is the normalised mean of the L2-normalised embeddings of
unrecognisable images; a face's ERS is the chordal distance of its normalised embedding from the UIC (0..2), and
a face whose ERS is below the threshold is unrecognisable. `calibrate_ers` builds both from real data: severely
degraded crops of LFW faces that no longer match their identity, detector false positives on the shared videos
and, optionally, the largest cluster of captured crops. It picks the threshold on a tuning split of LFW identities
and reports the separation on the disjoint test split. The result is saved beside the FR model's manifest
(`ers.json`: one per dense model, whatever the pruning recipe). Without it, ers_builtin.py builds one at
first use from images inside the installed packages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from agent.common.cache import read_json, write_json
from agent.common.fr_spec import FRSpec
from agent.common.images import ImageError, expand_paths, read_image
from agent.pipeline.align import align
from agent.pipeline.detect import Detector, DetectorSpec, make_detector
from agent.pipeline.score import Scorer, l2n
from agent.quality.edc import threshold_at_fmr
from agent.types import Detection

if TYPE_CHECKING:
    from agent.pipeline.select import Candidate
    from engines.prepare import PreparedFR

log = logging.getLogger(__name__)

ERS_FILE = "ers.json"
FMR = 1e-3
TUNE_VIDEOS = ("facenet_pytorch_video.mp4", "inspireface_810_1684206192.mp4")
TEST_VIDEOS = ("short_hamilton_clip.mp4",)


@dataclass
class ErsModel:
    uic: np.ndarray  # (d,) unit vector
    threshold: float  # ERS below it: unrecognisable
    match_threshold: float | None  # cosine similarity at FMR 1e-3 between clean faces of the tuning split
    identity_floor: float | None  # cosine to an identity's centre that 90 % of other people's faces stay below
    # (tuning split). Both None for the built-in calibration (agent/quality/ers_builtin.py), which has no identities.
    info: dict = field(default_factory=dict)  # how it was built, counts, separation figures

    def scores(self, embs: np.ndarray) -> np.ndarray:
        return np.linalg.norm(l2n(embs) - self.uic, axis=1)

    def score(self, emb: np.ndarray) -> float:
        return float(self.scores(np.asarray(emb)[None])[0])

    def recognisable(self, emb: np.ndarray) -> bool:
        return self.score(emb) >= self.threshold


def ers_path(prepared: PreparedFR, builtin: bool = False) -> Path:
    """Where the FR model's ERS is saved: beside the dense model (`bestshot ers calibrate`'s, and the built-in one of
    the FP32 graph), or with `builtin`, where this graph's built-in one goes: another precision's numerics move the
    embeddings, so its built-in ERS is saved beside its own graph."""
    if builtin and prepared.manifest.get("precision", "fp32") != "fp32":
        return prepared.dir / ERS_FILE
    return prepared.dir.parent / ERS_FILE


def save_ers(prepared: PreparedFR, model: ErsModel, builtin: bool = False) -> Path:
    path = ers_path(prepared, builtin)
    write_json(path, {**model.info, "uic": [round(float(v), 7) for v in model.uic], "threshold": model.threshold,
                      "match_threshold": model.match_threshold, "identity_floor": model.identity_floor,
                      "dense_sha256": prepared.manifest["dense_sha256"]})
    return path


def load_ers(prepared: PreparedFR, builtin: bool = False) -> ErsModel | None:
    """The calibrated ERS of this FR model (with `builtin`: at this graph's built-in place), or None (not calibrated,
    or calibrated for another dense model)."""
    path = ers_path(prepared, builtin)
    data = read_json(path)
    keys = ("threshold", "match_threshold", "identity_floor")
    if data is None:
        return None
    if data.get("dense_sha256") != prepared.manifest["dense_sha256"] or not all(k in data for k in ("uic", *keys)):
        log.warning("%s is stale (another dense model or format): ignored, a built-in ERS replaces it (or run "
                    "`bestshot ers calibrate`)", path)
        return None
    info = {k: v for k, v in data.items() if k not in ("uic", *keys)}
    return ErsModel(l2n(np.asarray(data["uic"], np.float32)[None])[0], float(data["threshold"]),
                    *(None if data[k] is None else float(data[k]) for k in keys[1:]), info)


def unit_mean(embs: np.ndarray) -> np.ndarray:
    return l2n(l2n(embs).mean(0, keepdims=True))[0]


def largest_cluster(embs: np.ndarray, max_distance: float) -> np.ndarray:
    """Indices of the largest cluster of average-linkage agglomerative clustering at this cosine distance."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if len(embs) < 2:
        return np.arange(len(embs))
    labels = fcluster(linkage(l2n(embs), method="average", metric="cosine"), max_distance, criterion="distance")
    return np.flatnonzero(labels == np.bincount(labels).argmax())


# --- verification metrics ---


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (the ROC AUC)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tar_at_fmr(genuine: np.ndarray, impostor: np.ndarray, fmr: float = FMR) -> float:
    return float((genuine >= threshold_at_fmr(impostor, fmr)).mean())


def balanced_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """The cut (midway between scores, mid-plateau) maximising (TPR + TNR) / 2 for `score >= cut` = positive."""
    s = np.unique(np.concatenate([pos, neg]))
    cuts = np.concatenate([[s[0] - 1e-6], (s[1:] + s[:-1]) / 2, [s[-1] + 1e-6]])
    pos_s, neg_s = np.sort(pos), np.sort(neg)
    tpr = 1 - np.searchsorted(pos_s, cuts) / len(pos)
    tnr = np.searchsorted(neg_s, cuts) / len(neg)
    best = np.flatnonzero(tpr + tnr == (tpr + tnr).max())
    return float(cuts[best[len(best) // 2]])


# --- unrecognisable material ---


def degrade(crop: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """A degraded copy of an aligned crop: downscale, blur, low light, noise and occlusion, each drawn at up to
    `severity` (0 = unchanged, 1 = typically unrecognisable)."""
    if severity <= 0:
        return crop.copy()
    h, w = crop.shape[:2]
    f = 1.0 - 0.95 * severity * rng.uniform(0.7, 1.0)
    small = cv2.resize(crop, (max(3, round(w * f)), max(3, round(h * f))), interpolation=cv2.INTER_AREA)
    out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    sigma = 0.04 * w * severity * rng.uniform(0.3, 1.0)
    if sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    out = out * (1.0 - 0.85 * severity * rng.uniform(0.0, 1.0))
    out += rng.normal(0.0, 45.0 * severity * rng.uniform(0.3, 1.0), out.shape)
    if rng.random() < severity:  # a block over part of the face
        bh, bw = (int(d * rng.uniform(0.3, 0.3 + 0.4 * severity)) for d in (h, w))
        y, x = rng.integers(h // 4, h - bh // 2), rng.integers(0, w - bw // 2)
        out[max(0, y - bh // 2) : y + bh // 2, x : x + bw] = rng.uniform(0, 255)
    return np.clip(out, 0, 255).astype(np.uint8)


def boxes_intersect(a: np.ndarray, b: np.ndarray) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def frame_false_positives(frame: np.ndarray, dets: Sequence[Detection], spec: FRSpec, face_score: float = 0.5,
                          max_score: float = 0.3, min_size: float = 16.0) -> list[np.ndarray]:
    """Aligned crops of the detections (from a detector built with a low threshold) scored below `max_score`, at
    least `min_size` px, that touch no face box (score >= face_score) of the frame."""
    faces = [d.bbox for d in dets if d.score >= face_score]
    return [align(frame, d, spec) for d in dets if d.score < max_score and d.size >= min_size
            and not any(boxes_intersect(d.bbox, f) for f in faces)]


def false_positive_crops(videos: Sequence[Path], detector: Detector, scorer: Scorer, every: int = 20,
                         face_score: float = 0.5, max_score: float = 0.3, min_size: float = 16.0) -> list[np.ndarray]:
    """`frame_false_positives` of every `every`-th frame of the videos."""
    crops = []
    for video in videos:
        cap = cv2.VideoCapture(str(video))
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % every == 0:
                crops += frame_false_positives(frame, detector.detect(frame), scorer.spec, face_score, max_score,
                                               min_size)
            i += 1
        cap.release()
    return crops


# --- faces ---


def largest_face(image: np.ndarray, detector: Detector) -> Detection | None:
    return max(detector.detect(image), key=lambda d: d.size, default=None)


@dataclass
class FaceSet:
    """Aligned faces with identity labels, their normalised embeddings and PreFIQs qualities."""

    labels: np.ndarray
    paths: list[Path]
    crops: list[np.ndarray]
    emb: np.ndarray
    quality: np.ndarray


def embed(scorer: Scorer, crops: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(normalised embeddings, qualities) of aligned crops."""
    if not crops:
        raise ValueError("no face crops to embed")
    scored = scorer.score(list(crops))
    return np.stack([s.embedding for s in scored]), np.array([s.quality for s in scored], np.float32)


def face_set(groups: Sequence[Sequence[Path]], detector: Detector, scorer: Scorer) -> FaceSet:
    """The largest face of each image, labelled by its group; unreadable or faceless images are skipped."""
    labels, paths, crops = [], [], []
    for label, group in enumerate(groups):
        for path in group:
            try:
                image = read_image(path)
            except ImageError as e:
                log.warning("%s", e)
                continue
            det = largest_face(image, detector)
            if det is not None:
                labels.append(label)
                paths.append(path)
                crops.append(align(image, det, scorer.spec))
    emb, quality = embed(scorer, crops)
    return FaceSet(np.array(labels), paths, crops, emb, quality)


def captured_embeddings(folder: Path, scorer: Scorer) -> np.ndarray:
    """Embeddings of captured aligned faces: the `*_face.jpg` crops that `bestshot subscribe --out` saves."""
    size, crops = scorer.spec.input_size, []
    for path in expand_paths([folder]):
        if path.stem.endswith("_face"):
            try:
                crops.append(cv2.resize(read_image(path), (size, size), interpolation=cv2.INTER_AREA))
            except ImageError as e:
                log.warning("%s", e)
    log.info("%d captured faces under %s", len(crops), folder)
    return embed(scorer, crops)[0]


def lfw_groups(images: Path, min_images: int = 2, per_person: int | None = None) -> list[list[Path]]:
    """Image paths per LFW person with at least `min_images`, sorted by name (at most `per_person` each)."""
    groups = [sorted(p.glob("*.jpg"))[:per_person] for p in sorted(images.iterdir()) if p.is_dir()]
    return [g for g in groups if len(g) >= min_images]


def best_genuine(emb: np.ndarray, ref: FaceSet) -> np.ndarray:
    """Per row of `emb` (aligned with `ref`'s faces): the best cosine to another face of the same identity."""
    same = ref.labels[:, None] == ref.labels[None, :]
    np.fill_diagonal(same, False)
    return np.where(same, emb @ ref.emb.T, -np.inf).max(1)


def impostor_scores(faces: FaceSet) -> np.ndarray:
    iu = np.triu_indices(len(faces.labels), 1)
    return (faces.emb @ faces.emb.T)[iu][faces.labels[iu[0]] != faces.labels[iu[1]]]


def centre_cosines(faces: FaceSet) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) cosines to identity centres, over identities with 3+ faces: each face against the
    centre of its identity's other faces, and every face of other identities against each full centre."""
    gen, imp = [], []
    for label in np.unique(faces.labels):
        idx = np.flatnonzero(faces.labels == label)
        if len(idx) < 3:
            continue
        emb = faces.emb[idx]
        gen.extend((emb * l2n(emb.sum(0) - emb)).sum(1))
        imp.extend(faces.emb[faces.labels != label] @ unit_mean(emb))
    return np.array(gen), np.array(imp)


# --- calibration ---


@dataclass
class _Split:
    clean: FaceSet
    match_threshold: float
    recognisable: np.ndarray  # clean faces matched by another face of theirs at FMR 1e-3
    degraded: np.ndarray  # embeddings of severely degraded crops that no longer match
    false_pos: np.ndarray  # embeddings of detector false positives

    @property
    def unrecognisable(self) -> np.ndarray:
        return np.concatenate([self.degraded, self.false_pos])


def _split(groups: list[list[Path]], videos: Sequence[Path], stills: Detector, low: Detector, scorer: Scorer,
           severe: tuple[float, float], fp_every: int, rng: np.random.Generator,
           match_threshold: float | None = None) -> _Split:
    clean = face_set(groups, stills, scorer)
    thr = threshold_at_fmr(impostor_scores(clean), FMR) if match_threshold is None else match_threshold
    deg, _ = embed(scorer, [degrade(c, rng.uniform(*severe), rng) for c in clean.crops])
    fps = false_positive_crops(videos, low, scorer, fp_every)
    fp_emb = embed(scorer, fps)[0] if fps else np.zeros((0, clean.emb.shape[1]), np.float32)
    return _Split(clean, thr, best_genuine(clean.emb, clean) >= thr, deg[best_genuine(deg, clean) < thr], fp_emb)


def calibrate_ers(scorer: Scorer, det_spec: DetectorSpec, shared: Path, per_person: int = 3,
                  max_people: int | None = None, captured: np.ndarray | None = None, seed: int = 0,
                  severe: tuple[float, float] = (0.8, 1.0), fp_every: int = 20,
                  compare: ErsModel | None = None) -> ErsModel:
    """Build the UIC and the thresholds from the shared data (`shared/`: LFW and videos), see the module doc.

    LFW people with 2+ images (at most `per_person` images each, `max_people` people per split) are split by
    sorted name into tuning (even) and test (odd) identities; the videos in TUNE_VIDEOS and TEST_VIDEOS (every
    `fp_every`-th frame) give each split its false positives. `compare`: another ERS model to report on the same
    test split. `captured`: embeddings of captured crops whose
    largest cluster (the "no identity" cluster) joins the unrecognisable set. Recognisable = a clean face matched
    by another image of its person at FMR 1e-3; unrecognisable = a severely degraded crop matched by none, or a
    false positive."""
    rng = np.random.default_rng(seed)
    groups = lfw_groups(shared / "data/lfw/images", 2, per_person)
    tune_groups, test_groups = groups[0::2][:max_people], groups[1::2][:max_people]
    stills = make_detector(replace(det_spec, input_size=256))  # LFW images are 250x250
    low = make_detector(replace(det_spec, score_threshold=0.05))
    videos = shared / "data/video"
    tune = _split(tune_groups, [videos / v for v in TUNE_VIDEOS], stills, low, scorer, severe, fp_every, rng)
    test = _split(test_groups, [videos / v for v in TEST_VIDEOS], stills, low, scorer, severe, fp_every, rng,
                  tune.match_threshold)
    unrec = [tune.unrecognisable]
    cluster_n = 0
    if captured is not None and len(captured):
        members = largest_cluster(captured, 1.0 - tune.match_threshold)
        cluster_n = len(members)
        unrec.append(l2n(captured)[members])
    _, imp = centre_cosines(tune.clean)
    model = ErsModel(unit_mean(np.concatenate(unrec)), 0.0, tune.match_threshold, float(np.quantile(imp, 0.9)))
    model.threshold = balanced_threshold(model.scores(tune.clean.emb[tune.recognisable]),
                                         model.scores(tune.unrecognisable))
    gen, imp = centre_cosines(test.clean)
    model.info = {
        "source": "lfw",
        "built": {"method": "UIC = normalised mean of unrecognisable embeddings (Deng et al.)",
                  "unrecognisable": f"LFW crops degraded at severity {severe[0]}-{severe[1]} that match no other "
                                    f"image of their person at FMR {FMR:g}; detector false positives (score < 0.3, "
                                    f"off every face box) on {', '.join(TUNE_VIDEOS)}"
                                    + ("; the largest cluster of the captured crops" if cluster_n else ""),
                  "threshold": "max balanced accuracy, recognisable (clean, matched at FMR 1e-3) vs unrecognisable,"
                               " on the tuning split (even-indexed LFW people by name)",
                  "identity_floor": "90th percentile of clean faces' cosine to other identities' centres (tuning"
                                    " split): a frame of another person falls below it 9 times in 10",
                  "test_split": f"odd-indexed LFW people; false positives from {', '.join(TEST_VIDEOS)}",
                  "seed": seed, "per_person": per_person},
        "counts": {"tune_people": len(tune_groups), "tune_clean": len(tune.clean.labels),
                   "tune_recognisable": int(tune.recognisable.sum()), "tune_degraded_unmatched": len(tune.degraded),
                   "tune_false_positives": len(tune.false_pos), "captured_cluster": cluster_n,
                   "test_people": len(test_groups), "test_recognisable": int(test.recognisable.sum()),
                   "test_degraded_unmatched": len(test.degraded), "test_false_positives": len(test.false_pos)},
        "separation": {"tune": _separation(model, tune), "test": _separation(model, test),
                       "test_by_severity": _by_severity(model, test, scorer, rng),
                       "test_identity_floor": {"genuine_below": round(float((gen < model.identity_floor).mean()), 4),
                                               "impostor_below": round(float((imp < model.identity_floor).mean()), 4)}},
    }
    if compare is not None:  # another calibration (the built-in one), judged on the same test split
        model.info["separation"]["test_other_calibration"] = {
            "source": compare.info.get("source"), "threshold": round(compare.threshold, 4),
            "cos_uic": round(float(compare.uic @ model.uic), 4), **_separation(compare, test)}
    log.info("ERS threshold %.3f, test AUC %.4f; identity floor %.3f", model.threshold,
             model.info["separation"]["test"]["auc"], model.identity_floor)
    return model


def _separation(model: ErsModel, s: _Split) -> dict:
    pos = model.scores(s.clean.emb[s.recognisable])
    deg, fp = model.scores(s.degraded), model.scores(s.false_pos)
    neg = np.concatenate([deg, fp])
    out = {"auc": auc(pos, neg), "auc_degraded": auc(pos, deg),
           "recognisable_kept": float((pos >= model.threshold).mean()),
           "unrecognisable_rejected": float((neg < model.threshold).mean()),
           "ers_mean_recognisable": float(pos.mean()), "ers_mean_degraded": float(deg.mean())}
    if len(fp):
        out |= {"auc_false_positives": auc(pos, fp), "ers_mean_false_positives": float(fp.mean())}
    return {k: round(v, 4) for k, v in out.items()}


def _by_severity(model: ErsModel, s: _Split, scorer: Scorer, rng: np.random.Generator, levels: int = 5) -> dict:
    """Test crops degraded at uniform random severity: per severity band the mean ERS, the share called
    recognisable and the share still matched; and how well ERS, and PreFIQs quality, predict a match (AUC)."""
    sev = rng.uniform(0, 1, len(s.clean.crops))
    emb, quality = embed(scorer, [degrade(c, v, rng) for c, v in zip(s.clean.crops, sev, strict=True)])
    ers = model.scores(emb)
    matched = best_genuine(emb, s.clean) >= s.match_threshold
    band = np.minimum((sev * levels).astype(int), levels - 1)
    rows = [{"severity": f"{b / levels:.1f}-{(b + 1) / levels:.1f}", "n": int((band == b).sum()),
             "ers_mean": round(float(ers[band == b].mean()), 4),
             "recognisable": round(float((ers[band == b] >= model.threshold).mean()), 4),
             "matched": round(float(matched[band == b].mean()), 4)} for b in range(levels)]
    return {"bands": rows, "auc_ers_predicts_match": round(auc(ers[matched], ers[~matched]), 4),
            "auc_quality_predicts_match": round(auc(quality[matched], quality[~matched]), 4)}


# --- track templates ---

WEIGHTS = ("ers", "quality", "mean")


def frame_weights(emb: np.ndarray, quality: np.ndarray, weights: str, ers: ErsModel | None = None) -> np.ndarray:
    """Per-frame template weights. "ers": the ERS margin over the threshold (frames judged unrecognisable count
    only when all are); "quality": 1 / drift^2 (PreFIQs drift D = 2 (1 - Q) as the noise scale: inverse-variance
    weights); "mean": equal."""
    if weights == "ers":
        if ers is None:
            raise ValueError("ERS-weighted templates need a calibrated ERS (`bestshot ers calibrate`)")
        return np.maximum(ers.scores(emb) - ers.threshold, 0.0) + 1e-3
    if weights == "quality":
        return 1.0 / np.maximum(2.0 * (1.0 - np.asarray(quality, np.float64)), 1e-3) ** 2
    if weights == "mean":
        return np.ones(len(emb))
    raise ValueError(f"unknown template weights {weights!r}: one of {WEIGHTS}")


def template_of(emb: np.ndarray, quality: np.ndarray, weights: str, ers: ErsModel | None = None) -> np.ndarray:
    w = frame_weights(emb, quality, weights, ers)
    return l2n((w[:, None] * l2n(emb)).sum(0, keepdims=True))[0]


def template(kept: Sequence[Candidate], weights: str = "ers", ers: ErsModel | None = None) -> np.ndarray:
    """A track's template: the weighted average of its kept frames' embeddings, re-normalised."""
    return template_of(np.stack([c.scored.embedding for c in kept]), np.array([c.scored.quality for c in kept]),
                       weights, ers)


def evaluate_templates(scorer: Scorer, det_spec: DetectorSpec, shared: Path, ers: ErsModel | None,
                       max_people: int | None = None, frames: int = 6, draws: int = 3, p_degraded: float = 0.6,
                       seed: int = 0) -> dict:
    """Verification of track templates against single frames on LFW pseudo-tracks.

    Test-split people (odd-indexed, as in `calibrate_ers`) with 4+ images: the first image is the enrolment, the
    next `frames` form a track, each frame degraded with probability `p_degraded` at a uniform random severity
    (`draws` independent draws). Genuine = a track's representation vs its enrolment, impostor = vs every other
    enrolment. Methods: the best frame by quality (the published best shot), the best frame by ERS, the plain
    mean, and the quality- and ERS-weighted templates. With `p_degraded` 0 the frames are the photos as they are
    (one draw): what varies is pose, expression, lighting and age."""
    rng = np.random.default_rng(seed)
    groups = [g for g in lfw_groups(shared / "data/lfw/images", 2, frames + 1)[1::2] if len(g) >= 4][:max_people]
    faces = face_set(groups, make_detector(replace(det_spec, input_size=256)), scorer)
    people = [idx for label in np.unique(faces.labels) if len(idx := np.flatnonzero(faces.labels == label)) >= 4]
    enrol = faces.emb[[idx[0] for idx in people]]
    pick: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "best_frame_quality": lambda e, q: e[np.argmax(q)], "mean": lambda e, q: template_of(e, q, "mean"),
        "template_quality": lambda e, q: template_of(e, q, "quality")}
    if ers is not None:
        pick |= {"best_frame_ers": lambda e, q: e[np.argmax(ers.scores(e))],
                 "template_ers": lambda e, q: template_of(e, q, "ers", ers)}
    sims: dict[str, list[np.ndarray]] = {k: [] for k in pick}
    draws = draws if p_degraded > 0 else 1  # nothing random is left to draw again
    for _ in range(draws):
        tracks = [embed(scorer, [degrade(faces.crops[i], rng.uniform(0, 1) if rng.random() < p_degraded else 0.0,
                                         rng) for i in idx[1:]]) for idx in people]
        for name, fn in pick.items():
            sims[name].append(np.stack([fn(e, q) for e, q in tracks]) @ enrol.T)
    off = ~np.eye(len(people), dtype=bool)
    methods = {}
    for name, s in sims.items():
        gen = np.concatenate([np.diag(x) for x in s])
        imp = np.concatenate([x[off] for x in s])
        methods[name] = {"tar_at_fmr_1e-3": round(tar_at_fmr(gen, imp), 4),
                         "tar_at_fmr_1e-2": round(tar_at_fmr(gen, imp, 1e-2), 4), "auc": round(auc(gen, imp), 4)}
    counts = {"tracks": len(people) * draws, "people": len(people), "genuine": len(people) * draws,
              "impostor": int(off.sum()) * draws}
    log.info("templates on %d tracks: %s", counts["tracks"], {k: v["tar_at_fmr_1e-3"] for k, v in methods.items()})
    protocol = (f"LFW test-split people with 4+ images: image 1 enrols, the next {frames} form a track, each frame "
                f"degraded with p={p_degraded} at uniform random severity, {draws} draws, seed {seed}")
    return {"protocol": protocol, "counts": counts, "methods": methods}
