"""Selection: cheap gates and a scoring budget per camera, then the best-by-quality shot per track.

Two halves, because they run on different threads:
- `Gate` (one per camera, on its worker thread) sees every tracked face. It drops implausible faces
  (too small, low detector score, blurred) before anything costly, and scores every other face while the
  shared scoring budget has room; when it runs short, it spends it where it pays: a track's first plausible
  face first, then faces whose cheap signals beat what the track already sent. A face it cannot send yet is
  kept as the track's pending candidate and sent when the track ends, so every track that had a plausible face
  gets scored.
- `Selector` (one, on the scoring thread) keeps each track's best scored candidate (and its top-K), applies
  the emit policy and turns ended tracks into `BestShot`s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from agent.common.images import face_grey
from agent.types import BestShot, Detection, Scored

log = logging.getLogger(__name__)


@dataclass
class SelectionConfig:
    min_face: float = 24.0  # px, shorter side of the box
    min_det_score: float = 0.5
    min_sharpness: float = 10.0  # variance of the Laplacian of the aligned crop (grey)
    min_quality: float = 0.0  # a track whose best is below this is published as "unrecognisable"
    # With a budget that runs short (under half of its burst left): a track's later face is scored when its cheap
    # signal beats the sent best by this factor, or when the track has sent nothing for refresh_s seconds.
    # Without a budget, or while it has more than half left, every gated face is scored.
    improve_factor: float = 1.1
    refresh_s: float = 0.25
    top_k: int = 8  # best frames kept per track: the pool for the template and the diverse shots (extra.top_k)
    update_every_s: float | None = None  # also publish an "update" for open tracks this often (pts seconds)
    update_on_improve: float | None = None  # ... or when the best quality improves by this much
    score_budget: float | None = None  # faces scored per second, all cameras together; None = unlimited


# The inner-face grey level of well-lit faces: the median of the selection score's clean calibration faces
# (its brightness cue, log(1 + grey) = 4.92, is hinged there too).
BRIGHT_GREY = 136.0


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the grey crop: low for blurred faces."""
    return float(cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY), cv2.CV_32F).var())


def cheap_signal(det: Detection, sharp: float, grey: float) -> float:
    """One number from the cheap cues, only to order faces for scoring (not a quality): the detector's score, less
    for a face under 112 px, a soft one (Laplacian variance under 100) or a dark one (inner-face grey level under
    BRIGHT_GREY: low light, which the other cues miss)."""
    return (float(det.score) * min(1.0, det.size / 112.0) * min(1.0, sharp / 100.0) ** 0.5
            * min(1.0, grey / BRIGHT_GREY) ** 0.5)


class TokenBucket:
    """A thread-safe scoring budget: `rate` tokens per second, bursts up to `burst`."""

    def __init__(self, rate: float | None, burst: float | None = None):
        self.rate = rate
        self.burst = burst or (rate or 0.0)
        self.tokens = self.burst
        self.t = time.monotonic()
        self.lock = threading.Lock()

    def take(self, keep: float = 0.0) -> bool:
        """Take a token if one is there and `keep` tokens remain after it."""
        if self.rate is None:
            return True
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= 1.0 + keep:
                self.tokens -= 1.0
                return True
            return False


@dataclass
class Candidate:
    """A gated face with its aligned crop, on its way to the scorer."""

    camera: str
    track_id: int
    frame_index: int
    pts: float
    det: Detection
    crop: np.ndarray = field(repr=False)
    context: np.ndarray = field(repr=False)
    sharpness: float
    cheap: float
    first_seen: float  # the track's, when this face was seen
    frames_seen: int
    scored: Scored | None = None


@dataclass
class TrackEnd:
    """A track's end, sent after its last candidate."""

    camera: str
    track_id: int
    first_seen: float
    last_seen: float
    frames_seen: int
    update_only: bool = False
    gated: dict[str, int] = field(default_factory=dict, compare=False)  # the track's faces not scored, by reason


@dataclass
class _GateTrack:
    first_seen: float
    last_seen: float
    frames_seen: int = 0
    sent_cheap: float = -1.0  # best cheap signal sent for scoring so far (-1: none)
    sent_pts: float = float("-inf")
    pending: Candidate | None = None
    gated: Counter = field(default_factory=Counter)  # reason -> faces not scored (Gate)


class Gate:
    """Per-camera gates and budget. `crop_fn(frame, det) -> (aligned, context)` does the alignment.

    Per track it counts the faces it did not score, by reason: `face_size`, `det_score`, `sharpness` (the gates)
    and `budget` (deferred, never scored); the track's end carries them (TrackEnd.gated, published as
    extra.gated)."""

    def __init__(self, camera: str, config: SelectionConfig, budget: TokenBucket):
        self.camera, self.config, self.budget = camera, config, budget
        self.tracks: dict[int, _GateTrack] = {}
        self.opened = self.closed = 0  # tracks seen, tracks ended
        self.gated = 0  # faces dropped by the cheap gates
        self.deferred = 0  # faces not scored for lack of budget (kept as pending)

    def observe(self, frame_index: int, pts: float, track_id: int, det: Detection,
                crop_fn: Callable[[Detection], tuple[np.ndarray, np.ndarray]]) -> Candidate | None:
        """Record a tracked face; return it as a candidate to score now, or None."""
        t = self.tracks.get(track_id)
        if t is None:
            t = self.tracks[track_id] = _GateTrack(first_seen=pts, last_seen=pts)
            self.opened += 1
        t.frames_seen += 1
        t.last_seen = pts
        cfg = self.config
        reason = "face_size" if det.size < cfg.min_face else "det_score" if det.score < cfg.min_det_score else None
        if reason is None:
            crop, context = crop_fn(det)
            sharp = sharpness(crop)
            reason = "sharpness" if sharp < cfg.min_sharpness else None
        if reason is not None:
            self.gated += 1
            t.gated[reason] += 1
            return None
        cheap = cheap_signal(det, sharp, face_grey(crop))
        cand = Candidate(self.camera, track_id, frame_index, pts, det, crop, context, sharp, cheap, t.first_seen,
                         t.frames_seen)
        # With a budget, spend it where it pays: a track's first face, a face whose cheap cues beat what the
        # track sent, or a fresh look after `refresh_s` (pose and expression escape the cheap cues) may take any
        # token; other faces only the upper half of the bucket, so they are scored while the budget has room
        # (as without one: the cheap cues miss what the selection score sees) and never starve promising ones.
        promising = (t.sent_cheap < 0 or cheap > t.sent_cheap * cfg.improve_factor
                     or pts - t.sent_pts >= cfg.refresh_s)
        if self.budget.take(keep=0.0 if promising else self.budget.burst / 2):
            t.sent_cheap, t.sent_pts = max(t.sent_cheap, cheap), pts
            if t.pending is not None and t.pending.cheap <= cheap:
                t.pending = None
            return cand
        self.deferred += 1
        t.gated["budget"] += 1
        if t.pending is None or cheap > t.pending.cheap:
            t.pending = cand
        return None

    def end(self, track_id: int) -> tuple[Candidate | None, TrackEnd | None]:
        """A track ended: its pending candidate (scored regardless of the budget) and its end record."""
        t = self.tracks.pop(track_id, None)
        if t is None:
            return None, None
        self.closed += 1
        pending = t.pending if t.pending is not None and t.pending.cheap > t.sent_cheap else None
        if pending is not None:
            t.gated["budget"] -= 1  # scored after all
        return pending, TrackEnd(self.camera, track_id, t.first_seen, t.last_seen, t.frames_seen,
                                 gated={k: n for k, n in t.gated.items() if n})



@dataclass
class _SelTrack:
    best: Candidate | None = None
    top: list[Candidate] = field(default_factory=list)
    frames_scored: int = 0
    last_update_pts: float | None = None
    last_update_quality: float = -1.0


class Selector:
    """Best shot per track by quality; emits `BestShot`s. Runs on one thread."""

    def __init__(self, config: SelectionConfig, model_id: str, trace: Callable[[dict], None] | None = None,
                 enrich: Callable[[Candidate, list[Candidate]], dict] | None = None):
        """enrich(best, kept): extra message fields for a shot (ERS, template, diverse shots), from the track's
        best candidate and the candidates it kept (top-K by quality)."""
        self.config, self.model_id, self.trace, self.enrich = config, model_id, trace, enrich
        self.tracks: dict[tuple[str, int], _SelTrack] = {}
        self.unscored_ends = 0  # tracks that ended with no scored candidate (nothing to publish)

    def add(self, cand: Candidate) -> BestShot | None:
        """Record a scored candidate; returns an "update" shot when the emit policy asks for one."""
        assert cand.scored is not None
        st = self.tracks.setdefault((cand.camera, cand.track_id), _SelTrack())
        st.frames_scored += 1
        q = cand.scored.quality
        if self.trace:
            self.trace({"event": "scored", "camera": cand.camera, "track_id": cand.track_id,
                        "frame_index": cand.frame_index, "pts": round(cand.pts, 4), "quality": q,
                        "prefiqs": cand.scored.prefiqs, "cues": cand.scored.cues, "drift": cand.scored.drift,
                        "det_score": float(cand.det.score), "size": cand.det.size,
                        "sharpness": round(cand.sharpness, 2)})
        if st.best is None or q > st.best.scored.quality:
            st.best = cand
        if self.config.top_k > 1:
            st.top = sorted([*st.top, cand], key=lambda c: -c.scored.quality)[: self.config.top_k]
        cfg = self.config
        if cfg.update_every_s is None and cfg.update_on_improve is None:
            return None
        due = cfg.update_every_s is not None and (
            st.last_update_pts is None or cand.pts - st.last_update_pts >= cfg.update_every_s)
        improved = cfg.update_on_improve is not None and st.best.scored.quality >= (
            st.last_update_quality + cfg.update_on_improve)
        if not (due or improved):
            return None
        st.last_update_pts, st.last_update_quality = cand.pts, st.best.scored.quality
        return self._shot(st, TrackEnd(cand.camera, cand.track_id, cand.first_seen, cand.pts, cand.frames_seen,
                                       update_only=True))

    def end(self, end: TrackEnd) -> BestShot | None:
        st = self.tracks.pop((end.camera, end.track_id), None)
        if st is None or st.best is None:
            self.unscored_ends += 1
            return None
        return self._shot(st, end)

    def _shot(self, st: _SelTrack, end: TrackEnd) -> BestShot:
        b = st.best
        status = "update" if end.update_only else (
            "best" if b.scored.quality >= self.config.min_quality else "unrecognisable")
        extra: dict = {"cues": {k: round(v, 5) for k, v in b.scored.cues.items()}} if b.scored.cues else {}
        if not end.update_only:
            extra["gated"] = dict(end.gated)
        if self.config.top_k > 1:
            extra["top_k"] = [{"frame_index": c.frame_index, "pts": round(c.pts, 4), "quality": c.scored.quality}
                              for c in st.top]
        if self.enrich is not None:
            extra.update(self.enrich(b, st.top or [b]))
        shot = BestShot(
            camera=b.camera, track_id=b.track_id, status=status, first_seen=end.first_seen, best_time=b.pts,
            last_seen=end.last_seen, frame_index=b.frame_index, bbox=b.det.bbox, landmarks=b.det.landmarks,
            det_score=float(b.det.score), quality=b.scored.quality, drift=b.scored.drift, prefiqs=b.scored.prefiqs,
            frames_seen=end.frames_seen, frames_scored=st.frames_scored, model_id=self.model_id,
            crop=b.crop, context=b.context, embedding=b.scored.embedding, extra=extra,
        )
        if self.trace:
            self.trace({"event": "published" if status != "update" else "update", "camera": b.camera,
                        "track_id": b.track_id, "frame_index": b.frame_index, "quality": b.scored.quality,
                        "status": status, "frames_seen": end.frames_seen, "frames_scored": st.frames_scored})
        return shot
