"""The selection score: what the selector ranks a track's frames by, in [0, 1], higher is better.

It fuses PreFIQs with the other evidence of the same scoring pass, each a cue that costs nothing more:
- `prefiqs`: Q = 1 - D/2 of the dense and 2:4 twin embeddings (strong on blur, downscaling, occlusion);
- `ers`: the dense embedding's distance from the unrecognisable-identity centre (noise, false detections);
- `activation_shallow`, `activation_shallow_spread`, `activation_deep`: how far the dense pass's per-channel
  activation means (and spreads) at two depths (engines/twin.py, STAT_DEPTHS) sit from their values on clean
  calibration faces, in units of those faces' own spread (the idea of batch-norm statistics as a domain-shift
  detector; strong on blur, motion, downscaling, where a degraded input drives early features off their range);
- `detector`: the detector's confidence (pose, partial faces);
- `brightness`: log mean grey level of the crop's eyes-to-mouth region (agent.pipeline.score.face_brightness),
  hinged: only a face darker than the clean calibration faces loses (low light, and noise and JPEG with it);
- `size`: the detection's size, hinged: log2(size / 100 px) below 100 px, 0 above (small, far faces).
Each cue is put on a common scale by the per-model calibration: 0 at the median of clean calibration faces, -1
at the median of severely degraded ones (`SelectionCalibration`, built at first use from the same packaged images
as the built-in ERS, agent/quality/ers_builtin.py, and saved beside the prepared twin). The activation cues' clean
reference is the packaged faces under geometric variation only (mirror, rotation, scale, shift): a reference that
also holds lightly blurred or darkened faces sits towards them and prefers a frame one step into a degradation.
The fused value is a weighted sum whose weights were fitted on the LFW tuning split only (`bestshot tune
--selection`, docs/QUALITY.md), then mapped through a logistic fitted on the tuning split's degraded pairs: **quality
is the estimated chance that the face, compared with a clean photo of the same person, still matches at FMR 1e-3**
(FaceNet). So `selection.min_quality: 0.5` keeps faces more likely to match than not. For another FR model the
weights and the probability are carried over (its own calibration puts the cues on the same scale); `bestshot tune
--selection` refits them where LFW is at hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import expit

from agent.common.cache import locked, read_json, write_json
from agent.pipeline.detect import DetectorSpec
from agent.pipeline.score import Evidence, Scorer
from agent.quality.ers import ErsModel
from agent.quality.ers_builtin import CalibrationFaces, calibration_faces, ensure_ers

if TYPE_CHECKING:
    from engines.prepare import PreparedFR

log = logging.getLogger(__name__)

SELECTIONS = ("fused", "prefiqs")
STATS_CUES = ("activation_shallow", "activation_shallow_spread", "activation_deep")
# Fitted by `bestshot tune --selection` on the LFW tuning split (docs/QUALITY.md, "Selection score"):
# pairwise-logistic weights over the tuning tracks' frames, then P(match at FMR 1e-3) over the tuning pairs.
WEIGHTS = {"prefiqs": 0.9762, "ers": 1.0495, "detector": 0.3912, "activation_deep": 1.0816,
           "activation_shallow": 1.344, "activation_shallow_spread": 1.0174, "brightness": 0.2699, "size": 0.4101}
PROBABILITY = (1.2541, 2.0045)  # (slope, intercept) of the logistic on the weighted sum
# Where the backend reports no activation statistics (TensorRT, the separate form): the same fit without them.
WEIGHTS_NO_STATS = {"prefiqs": 1.6386, "ers": 1.3992, "detector": 0.486, "brightness": 0.2961, "size": 0.5228}
PROBABILITY_NO_STATS = (1.2653, 0.4683)
CALIBRATION_VERSION = 2  # 2: activation reference from geometric variants only; brightness medians
SIZE_HINGE = 100.0  # px: the size cue is log2(size / SIZE_HINGE) below it, 0 above


@dataclass
class SelectionCalibration:
    """Per prepared model: the activation statistics of the geometric calibration variants (mean and spread of each
    channel's statistic, per stats output) and each cue's medians on clean and on degraded calibration faces."""

    reference: dict[str, tuple[np.ndarray, np.ndarray]]  # "<i>/mean" | "<i>/std" -> (centre, spread) per channel
    clean: dict[str, float]
    degraded: dict[str, float]

    def to_json(self) -> dict:
        return {"version": CALIBRATION_VERSION, "clean": self.clean, "degraded": self.degraded,
                "reference": {k: [c.tolist(), s.tolist()] for k, (c, s) in self.reference.items()}}

    @classmethod
    def from_json(cls, d: dict) -> SelectionCalibration:
        ref = {k: (np.asarray(c, np.float64), np.asarray(s, np.float64)) for k, (c, s) in d["reference"].items()}
        return cls(ref, d["clean"], d["degraded"])


def channel_stats(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`stats/<i>/mean` and `stats/<i>/meansq` -> per channel "<i>/mean" and "<i>/std" (N, C)."""
    out = {}
    for name, mean in stats.items():
        if name.endswith("/mean"):
            key = name.removeprefix("stats/").removesuffix("/mean")
            sq = stats[name.removesuffix("mean") + "meansq"]
            out[f"{key}/mean"] = mean.astype(np.float64)
            out[f"{key}/std"] = np.sqrt(np.maximum(sq.astype(np.float64) - mean.astype(np.float64) ** 2, 0.0))
    return out


def raw_cues(ev: Evidence, ers: ErsModel, reference: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> dict:
    """Every cue, higher is better, before calibration (activation cues only with statistics and a reference)."""
    cues = {"prefiqs": 1.0 - ev.drift / 2.0, "ers": ers.scores(ev.dense), "detector": ev.det_score.astype(np.float64),
            "brightness": ev.brightness, "size": ev.det_size}
    stats = channel_stats(ev.stats)
    if reference and stats:
        def dist(key: str) -> np.ndarray:
            centre, spread = reference[key]
            return -np.sqrt(np.mean(((stats[key] - centre) / spread) ** 2, axis=1))

        cues["activation_shallow"] = dist("0/mean")
        cues["activation_shallow_spread"] = dist("0/std")
        cues["activation_deep"] = dist("1/mean")
    return cues


class SelectionScore:
    """The `Selection` hook of the scorer (agent.pipeline.score): evidence -> quality in [0, 1] and its cues."""

    def __init__(self, ers: ErsModel, calibration: SelectionCalibration):
        self.ers, self.calibration = ers, calibration

    def scale(self, cues: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each cue on the calibration's scale: 0 = clean calibration faces' median, -1 = degraded ones'.
        Unknown detector confidence, size or brightness (NaN) count as clean."""
        out = {}
        for k, v in cues.items():
            if k == "detector":  # already a probability
                out[k] = (np.nan_to_num(v, nan=1.0) - 1.0) / 0.5
            elif k == "size":
                out[k] = np.minimum(0.0, np.log2(np.nan_to_num(v, nan=SIZE_HINGE) / SIZE_HINGE))
            else:
                c, d = self.calibration.clean[k], self.calibration.degraded[k]
                out[k] = (v - c) / (c - d if abs(c - d) > 1e-12 else 1.0)
                if k == "brightness":  # only darker than clean loses
                    out[k] = np.minimum(0.0, np.nan_to_num(out[k], nan=0.0))
        return out

    def __call__(self, ev: Evidence) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        cues = raw_cues(ev, self.ers, self.calibration.reference)
        full = all(k in cues for k in STATS_CUES)
        weights = WEIGHTS if full else WEIGHTS_NO_STATS
        slope, icpt = PROBABILITY if full else PROBABILITY_NO_STATS
        z = self.scale(cues)
        s = sum(w * z[k] for k, w in weights.items())
        q = expit(slope * s + icpt)
        return q, cues


# ---------------------------------------------------------------- calibration


def build_calibration(scorer: Scorer, ers: ErsModel, faces: CalibrationFaces) -> SelectionCalibration:
    """Reference statistics from the geometric variants; each cue's clean median on the geometric variants
    (activation cues) or the recognisable faces (the others), and its median on the degraded faces."""

    def evidence(crops: Sequence[np.ndarray]) -> Evidence:
        parts = [scorer.evidence(crops[i : i + 4]) for i in range(0, len(crops), 4)]  # small batches: arena
        return Evidence(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("drift", "dense")),
                        {k: np.concatenate([p.stats[k] for p in parts]) for k in parts[0].stats},
                        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("det_score", "det_size",
                                                                                    "brightness")))

    ev_geo, ev_clean, ev_deg = (evidence(c) for c in (faces.geometric, faces.recognisable, faces.degraded))
    reference = {k: (v.mean(0), v.std(0) + 1e-6) for k, v in channel_stats(ev_geo.stats).items()}

    def medians(ev: Evidence) -> dict[str, float]:
        cues = raw_cues(ev, ers, reference)
        return {k: float(np.median(v)) for k, v in cues.items() if k not in ("detector", "size")}

    clean = medians(ev_clean) | {k: v for k, v in medians(ev_geo).items() if k in STATS_CUES}
    return SelectionCalibration(reference, clean, medians(ev_deg))


def same_ers(saved: dict, ers: ErsModel) -> bool:
    """Whether a saved calibration was built with this ERS: its centre within 1e-4 per component (a saved and
    reloaded ERS moves by about 1e-7; another build or precision by about 1e-2)."""
    centre = saved.get("ers_uic")
    return centre is not None and len(centre) == len(ers.uic) and np.allclose(centre, ers.uic, rtol=0, atol=1e-4)


def selection_path(prepared: PreparedFR) -> Path:
    return prepared.dir / "selection.json"


def ensure_selection(scorer: Scorer, prepared: PreparedFR, ers: ErsModel | None, mode: str,
                     material: Callable[[Scorer], CalibrationFaces], detector: str) -> SelectionScore | None:
    """The scorer's selection hook for `mode`: "fused" (needs ERS; the calibration is loaded, or built from
    `material(scorer)` and saved beside the twin), or "prefiqs" (None: Q itself). `detector`, the kind whose crops
    `material` aligns, is saved with the calibration: another detector's is built again (the crops differ)."""
    if mode not in SELECTIONS:
        raise ValueError(f"unknown selection {mode!r}: use one of {', '.join(SELECTIONS)}")
    if mode == "prefiqs":
        return None
    if ers is None:
        log.error("selection: no ERS for %s, so quality is PreFIQs alone", scorer.model_id)
        return None
    path = selection_path(prepared)
    with locked(path):
        saved = read_json(path)
        # the ERS cue's medians are that ERS's: another ERS (`ers calibrate` since, another precision's) builds again
        if saved and saved.get("version") == CALIBRATION_VERSION and saved.get("detector") == detector \
                and same_ers(saved, ers):
            calib = SelectionCalibration.from_json(saved)
        else:
            faces = material(scorer)
            calib = build_calibration(scorer, ers, faces)
            write_json(path, calib.to_json() | {"detector": detector, "ers_uic": [round(float(v), 5) for v in ers.uic]})
            log.info("selection calibration for %s from %d geometric, %d clean and %d degraded faces (%s): saved %s",
                     scorer.model_id, len(faces.geometric), len(faces.recognisable), len(faces.degraded), detector,
                     path)
    return SelectionScore(ers, calib)


def with_selection(scorer: Scorer, prepared: PreparedFR, det_spec: DetectorSpec, mode: str = "fused"
                   ) -> ErsModel | None:
    """Make the scorer's quality what `mode` says (the service, `score`, `curate` and `eval templates` all go
    through here): the FR model's ERS (saved, else built-in), then the selection hook. Returns the ERS."""
    ers = ensure_ers(scorer, prepared, det_spec)
    scorer.selection = ensure_selection(scorer, prepared, ers, mode, lambda s: calibration_faces(s.spec, det_spec),
                                        det_spec.kind)
    return ers


# ---------------------------------------------------------------- fitting (bestshot tune --selection)


def fit_weights(z: np.ndarray, tracks: Sequence[np.ndarray], utility: np.ndarray, min_gap: float = 0.02,
                l2: float = 1e-2) -> np.ndarray:
    """Weights of the cues (columns of `z`) by pairwise logistic regression: within each track, every pair of
    frames whose utilities differ by `min_gap` or more says which should rank higher."""
    diff, label = [], []
    for idx in tracks:
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if abs(utility[i] - utility[j]) >= min_gap:
                    diff.append(z[i] - z[j])
                    label.append(float(utility[i] > utility[j]))
    x, y = np.array(diff), np.array(label)
    return _logistic(x, y, l2, intercept=False)[0]


def fit_probability(s: np.ndarray, matched: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of P(matched | s) by logistic regression."""
    w, b = _logistic(s[:, None], matched.astype(np.float64), 0.0, intercept=True)
    return float(w[0]), float(b)


def _logistic(x: np.ndarray, y: np.ndarray, l2: float, intercept: bool) -> tuple[np.ndarray, float]:
    n, d = x.shape

    def loss(p: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = p[:d], (p[d] if intercept else 0.0)
        z = x @ w + b
        prob = expit(z)
        nll = np.mean(np.logaddexp(0.0, z) - y * z)
        g = x.T @ (prob - y) / n + 2 * l2 * w
        grad = np.append(g, np.mean(prob - y)) if intercept else g
        return nll + l2 * float(w @ w), grad

    from scipy.optimize import minimize

    p = minimize(loss, np.zeros(d + int(intercept)), jac=True, method="L-BFGS-B").x
    return p[:d], float(p[d]) if intercept else 0.0
