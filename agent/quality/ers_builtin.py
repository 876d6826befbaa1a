"""An ERS for any FR model, calibrated at first use from images that ship inside the installed packages, so that
every scored face and every message carries ERS without a data set (`bestshot ers calibrate` on LFW replaces it).

Unrecognisable material (the UIC is its normalised mean embedding, as in Deng et al.):
- the three face photos of the packages (scikit-image's astronaut and cameraman, matplotlib's Grace Hopper), each
  aligned crop degraded `degraded_draws` times at severity 0.8-1.0 (agent.quality.ers.degrade);
- scikit-image's 100 LFW non-face patches (the negatives of its face-detection example);
- the detector's false positives (score < 0.3, touching no face) on the packages' other photos, and random square
  crops of those photos: what a drifting track or a spurious detection hands the scorer.
Recognisable material, for the threshold: the three aligned faces and `positive_draws` light variants of each
(mirror, rotation up to 10 degrees, scale 0.92-1.08, shift up to 4 %, degradation severity up to 0.2). The
threshold is the max-balanced-accuracy cut between the two sets. docs/QUALITY.md compares the result with the LFW
calibration on LFW's test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import cv2
import numpy as np

from agent.common.cache import locked
from agent.common.fr_spec import FRSpec
from agent.pipeline.align import align
from agent.pipeline.detect import Detector, DetectorSpec, make_detector
from agent.pipeline.score import Int8Calibration, Scorer
from agent.pipeline.sources.demo import people
from agent.quality.ers import (
    ErsModel,
    balanced_threshold,
    degrade,
    embed,
    ers_path,
    frame_false_positives,
    load_ers,
    save_ers,
    unit_mean,
)

if TYPE_CHECKING:
    from engines.prepare import PreparedFR

log = logging.getLogger(__name__)

FACE_SCORE = 0.5
SCENES = ("coffee", "chelsea", "rocket", "brick", "grass", "gravel", "text", "page", "coins", "hubble_deep_field",
          "horse", "cell", "immunohistochemistry", "moon", "logo", "clock", "colorwheel")


class BuiltinErsError(RuntimeError):
    """The built-in ERS cannot be built with this detector."""


def _bgr(image: np.ndarray) -> np.ndarray:
    """scikit-image's RGB / grey / float arrays as 8-bit BGR."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        x = np.clip(x * 255.0 if x.max() <= 1.0 else x, 0, 255).astype(np.uint8)
    if x.ndim == 2:
        return cv2.cvtColor(x, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(x, cv2.COLOR_RGBA2BGR if x.shape[2] == 4 else cv2.COLOR_RGB2BGR)


def face_photos() -> list[np.ndarray]:
    """The astronaut, the cameraman and Grace Hopper (the first and last are the demo clip's people)."""
    from skimage import data as skdata  # imported here: it costs an agent start that needs no photo

    hopper, astronaut = (p.image for p in people())
    return [astronaut, _bgr(skdata.camera()), hopper]


def scenes() -> list[np.ndarray]:
    from skimage import data as skdata

    return [_bgr(getattr(skdata, name)()) for name in SCENES]


def _geometric_variant(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = crop.shape[0]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    m = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-10, 10), rng.uniform(0.92, 1.08))
    m[:, 2] += rng.uniform(-0.04, 0.04, 2) * size
    return cv2.warpAffine(np.ascontiguousarray(crop), m, (size, size), borderMode=cv2.BORDER_REFLECT)


def _light_variant(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return degrade(_geometric_variant(crop, rng), rng.uniform(0.0, 0.2), rng)


def _faces(low: Detector, spec: FRSpec, kind: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The packaged face photos' aligned faces, and the detector's false positives on those photos."""
    faces, false_pos = [], []
    for photo in face_photos():
        dets = low.detect(photo)
        det = max((d for d in dets if d.score >= FACE_SCORE), key=lambda d: d.size, default=None)
        if det is None:
            raise BuiltinErsError(f"the {kind} detector finds no face in one of the packages' face photos")
        faces.append(align(photo, det, spec))
        false_pos += frame_false_positives(photo, dets, spec, FACE_SCORE, min_size=0.0)
    return faces, false_pos


def _variants(faces: list[np.ndarray], rng: np.random.Generator, positive_draws: int,
              degraded_draws: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(the faces and their light variants, their severely degraded copies)."""
    positive = faces + [_light_variant(c, rng) for c in faces for _ in range(positive_draws)]
    return positive, [degrade(c, rng.uniform(0.8, 1.0), rng) for c in faces for _ in range(degraded_draws)]


@dataclass
class CalibrationFaces:
    """The selection score's calibration material (agent/quality/selection.py), aligned crops of the packaged faces:
    `geometric`: the faces and their mirrored, rotated, scaled and shifted variants only (the activation cues'
    clean reference); `recognisable`: the same faces with light variants that are also degraded up to severity 0.2
    (`builtin_ers`' recognisable set); `degraded`: their severely degraded copies."""

    geometric: list[np.ndarray]
    recognisable: list[np.ndarray]
    degraded: list[np.ndarray]


def calibration_faces(spec: FRSpec, det_spec: DetectorSpec | None = None, seed: int = 0, positive_draws: int = 20,
                      degraded_draws: int = 30) -> CalibrationFaces:
    """The packaged faces' calibration material for the selection score (see `CalibrationFaces`), aligned for
    `spec`."""
    det_spec = det_spec or DetectorSpec()
    low = make_detector(replace(det_spec, score_threshold=0.05))
    faces, _ = _faces(low, spec, det_spec.kind)
    rng = np.random.default_rng(seed)
    geometric = faces + [_geometric_variant(c, rng) for c in faces for _ in range(positive_draws)]
    return CalibrationFaces(geometric, *_variants(faces, np.random.default_rng(seed), positive_draws, degraded_draws))


def int8_calibration(det_spec: DetectorSpec | None = None) -> Int8Calibration:
    """INT8 calibration crops for `scoring.precision: int8`: all of the selection score's material (clean, geometric,
    lightly and severely degraded packaged faces), so the activation ranges cover dark and noisy faces too."""
    det_spec = det_spec or DetectorSpec()

    def crops(spec: FRSpec) -> list[np.ndarray]:
        faces = calibration_faces(spec, det_spec)
        return faces.geometric + faces.recognisable + faces.degraded

    return Int8Calibration(f"packaged-{det_spec.kind}-v2", crops)


def builtin_ers(scorer: Scorer, det_spec: DetectorSpec, seed: int = 0, positive_draws: int = 20,
                degraded_draws: int = 30, background: int = 60) -> ErsModel:
    """Build the UIC and threshold from the packages' images (see the module doc)."""
    rng = np.random.default_rng(seed)
    size, spec = scorer.spec.input_size, scorer.spec
    low = make_detector(replace(det_spec, score_threshold=0.05))  # one session: faces are its detections >= 0.5
    faces, face_photo_fps = _faces(low, spec, det_spec.kind)
    positive, degraded = _variants(faces, rng, positive_draws, degraded_draws)
    from skimage import data as skdata

    patches = [cv2.resize(_bgr(p), (size, size), interpolation=cv2.INTER_LINEAR) for p in skdata.lfw_subset()[100:]]
    photos = scenes()
    # every size: the packaged photos give few false positives
    false_pos = [c for photo in photos for c in frame_false_positives(photo, low.detect(photo), spec, FACE_SCORE,
                                                                        min_size=0.0)] + face_photo_fps
    crops = []
    for _ in range(background):
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.1, 0.5) * min(h, w))
        y, x = rng.integers(0, h - side), rng.integers(0, w - side)
        crops.append(cv2.resize(photo[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA))
    # in small batches: ONNX Runtime's arena keeps what the largest batch took, for the life of the agent
    small = Scorer(scorer.spec, scorer.pair, min(scorer.max_batch, 4), scorer.model_id)
    pos = embed(small, positive)[0]
    neg = embed(small, degraded + patches + false_pos + crops)[0]
    model = ErsModel(unit_mean(neg), 0.0, None, None)
    pos_s, neg_s = model.scores(pos), model.scores(neg)
    model.threshold = balanced_threshold(pos_s, neg_s)
    model.info = {
        "source": "builtin",
        "built": {"method": "UIC = normalised mean of unrecognisable embeddings (Deng et al.), from images inside "
                            "the installed packages (agent/quality/ers_builtin.py)",
                  "detector": det_spec.kind, "seed": seed},
        "counts": {"recognisable": len(positive), "degraded": len(degraded), "non_face_patches": len(patches),
                   "false_positives": len(false_pos), "background_crops": len(crops)},
        "separation": {"calibration": {
            "recognisable_kept": round(float((pos_s >= model.threshold).mean()), 4),
            "unrecognisable_rejected": round(float((neg_s < model.threshold).mean()), 4),
            "ers_mean_recognisable": round(float(pos_s.mean()), 4),
            "ers_mean_unrecognisable": round(float(neg_s.mean()), 4)}},
    }
    log.info("built-in ERS for %s: threshold %.3f from %d recognisable and %d unrecognisable crops",
             scorer.model_id, model.threshold, len(pos), len(neg))
    return model


def ensure_ers(scorer: Scorer, prepared: PreparedFR, det_spec: DetectorSpec) -> ErsModel | None:
    """The FR model's ERS: the saved calibration (`bestshot ers calibrate`), else the built-in one that this graph's
    precision and this detector built earlier, else one built now and saved (`ers_path(prepared, builtin=True)`).
    None (logged as an error) when it cannot be built: the agent then runs without ERS (quality-weighted
    templates)."""
    precision = prepared.manifest.get("precision", "fp32")
    with locked(ers_path(prepared, builtin=True)):
        model = load_ers(prepared)
        if model is None or model.info.get("source") == "builtin":  # no calibration: this graph's built-in one
            if ers_path(prepared, builtin=True) != ers_path(prepared):
                model = load_ers(prepared, builtin=True)
            built = model.info.get("built", {}) if model is not None else {}
            if model is not None and (built.get("detector"), built.get("precision")) != (det_spec.kind, precision):
                log.info("the saved built-in ERS of %s is for detector %s, precision %s: building it for %s, %s",
                         scorer.model_id, built.get("detector"), built.get("precision", "unrecorded"), det_spec.kind,
                         precision)
                model = None
        if model is None:
            try:
                model = builtin_ers(scorer, det_spec)
            except BuiltinErsError as e:
                log.error("no ERS for %s: cannot build the built-in one (%s); messages carry no ERS until "
                          "`bestshot ers calibrate` runs", scorer.model_id, e)
                return None
            model.info.setdefault("built", {})["precision"] = precision
            log.info("saved %s (`bestshot ers calibrate` on LFW replaces it)", save_ers(prepared, model, builtin=True))
    return model
