"""ByteTrack-style face tracker: IoU matching of a box predicted at constant (damped) velocity.

Own code rather than the `trackers` package: that pulls supervision, rich, requests and a second OpenCV into an
edge agent for about 150 lines of logic; scipy's Hungarian solver does the matching.

Per update (ByteTrack): predict every track's box at `t`; match the high-score detections to all tracks (tracked and
lost) by IoU, then what is left over by IoU of the boxes grown `buffer_scale` times around their centres (the
cascaded buffered IoU of C-BIoU, Yang et al. 2023: a face that moved more than its size since its last detection, at
a low detection rate or after a miss, no longer overlaps its prediction); match the low-score ones to the confirmed
tracks still unmatched that were matched at the previous update; start a tentative track from each unmatched high
detection scoring at least `new_track_threshold`. A tentative track missed once is dropped; a confirmed one missed
for more than `max_lost_s` ends.
Times are pts seconds, so frame rate and skipped frames only change the time between updates.
Only confirmed tracks are output: the first `min_hits - 1` detections of each track are not reported.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from agent.types import Detection, TrackedFace

log = logging.getLogger(__name__)


@dataclass
class TrackerConfig:
    high_threshold: float = 0.5  # detections scoring at least this are "high"
    low_threshold: float = 0.1  # detections scoring below this are ignored
    match_iou: float = 0.3  # least IoU for the first (high-score) association
    low_match_iou: float = 0.5  # least IoU for the second (low-score) association
    buffer_scale: float = 1.5  # each association again on what it left, boxes grown this much (1: off)
    new_track_threshold: float = 0.6  # unmatched high detections scoring at least this start a track
    min_hits: int = 2  # matched updates (the first included) before a track is confirmed and output
    max_lost_s: float = 1.0  # a confirmed track unmatched for longer than this ends
    max_open_tracks: int = 64  # upstream tracks open per camera; beyond it the least recently seen one ends
    max_open_tracks_input: int = 128  # the same over all the cameras of one upstream input
    velocity_tau_s: float = 0.5  # prediction moves v * tau * (1 - exp(-dt / tau)): v * dt early, bounded late


@dataclass
class TrackUpdate:
    active: list[TrackedFace]  # confirmed tracks matched at this update, with this update's detection
    ended: list[int] = field(default_factory=list)  # confirmed tracks ended at this update


@dataclass
class _Track:
    det: Detection
    t: float  # pts of the last match
    hits: int = 1
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))  # box px/s
    track_id: int | None = None  # given on confirmation
    tracked: bool = True  # matched at the latest update

    def predict(self, t: float, tau: float) -> np.ndarray:
        dt = max(t - self.t, 0.0)
        return self.det.bbox + self.velocity * (tau * -np.expm1(-dt / tau))

    def match(self, det: Detection, t: float) -> None:
        if t > self.t:
            self.velocity = (det.bbox - self.det.bbox) / np.float32(t - self.t)
        self.det, self.t, self.hits, self.tracked = det, t, self.hits + 1, True


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) IoU of xyxy boxes a (n, 4) and b (m, 4)."""
    a, b = np.asarray(a, np.float32).reshape(-1, 1, 4), np.asarray(b, np.float32).reshape(1, -1, 4)
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[..., 2:] - a[..., :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _grown(boxes: np.ndarray, scale: float) -> np.ndarray:
    """xyxy boxes scaled `scale` times about their centres."""
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    return np.concatenate([centre - half, centre + half], axis=1)


def _matches(a: np.ndarray, b: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """Hungarian (row of a, row of b) pairs maximising total IoU, each at least `min_iou`."""
    iou = iou_matrix(a, b)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return [(r, c) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= min_iou]


def _assign(tracks: list[_Track], dets: list[Detection], t: float, tau: float, min_iou: float,
            buffer_scale: float = 1.0) -> list[tuple[int, int]]:
    """(track index, detection index) pairs by IoU of predicted and detected boxes, each at least `min_iou`; then,
    with `buffer_scale` > 1, the tracks and detections left over by IoU of the grown boxes."""
    if not tracks or not dets:
        return []
    pred, boxes = np.stack([tr.predict(t, tau) for tr in tracks]), np.stack([d.bbox for d in dets])
    pairs = _matches(pred, boxes, min_iou)
    rest_t = np.setdiff1d(np.arange(len(tracks)), [r for r, _ in pairs])
    rest_d = np.setdiff1d(np.arange(len(dets)), [c for _, c in pairs])
    if buffer_scale > 1.0 and len(rest_t) and len(rest_d):
        grown = _matches(_grown(pred[rest_t], buffer_scale), _grown(boxes[rest_d], buffer_scale), min_iou)
        pairs += [(int(rest_t[r]), int(rest_d[c])) for r, c in grown]
    return pairs


class Tracker:
    """Give detections of successive updates track ids; see the module docstring for the steps."""

    def __init__(self, config: TrackerConfig | None = None, ids: Iterator[int] | None = None):
        """ids: where track ids come from (default 1, 2, ...); a shared counter keeps ids unique when a camera's
        tracker is replaced (configuration reload)."""
        self.config = config or TrackerConfig()
        self.tracks: list[_Track] = []
        self._ids = ids if ids is not None else itertools.count(1)

    def update(self, dets: list[Detection], t: float) -> TrackUpdate:
        cfg, tau = self.config, self.config.velocity_tau_s
        stale = [tr for tr in self.tracks if t - tr.t > cfg.max_lost_s]
        ended = sorted(tr.track_id for tr in stale if tr.track_id is not None)
        tracks = [tr for tr in self.tracks if t - tr.t <= cfg.max_lost_s]
        high = [d for d in dets if d.score >= cfg.high_threshold]
        low = [d for d in dets if cfg.low_threshold <= d.score < cfg.high_threshold]

        pairs = _assign(tracks, high, t, tau, cfg.match_iou, cfg.buffer_scale)
        matched = [(tracks[r], high[c]) for r, c in pairs]
        used, first = {c for _, c in pairs}, {r for r, _ in pairs}
        second = [tr for i, tr in enumerate(tracks) if i not in first and tr.tracked and tr.track_id is not None]
        matched += [(second[r], low[c]) for r, c in _assign(second, low, t, tau, cfg.low_match_iou, cfg.buffer_scale)]

        for tr in tracks:
            tr.tracked = False
        new = [_Track(d, t) for c, d in enumerate(high) if c not in used and d.score >= cfg.new_track_threshold]
        for tr, det in matched:
            tr.match(det, t)
        for tr in [tr for tr, _ in matched] + new:
            if tr.track_id is None and tr.hits >= cfg.min_hits:
                tr.track_id = next(self._ids)
        # tentative tracks missed once are dropped; confirmed ones are kept (lost) until stale
        self.tracks = [tr for tr in tracks if tr.tracked or tr.track_id is not None] + new
        if ended:
            log.debug("tracks ended at %.3f: %s", t, ended)
        active = [TrackedFace(tr.track_id, tr.det) for tr in self.tracks if tr.tracked and tr.track_id is not None]
        return TrackUpdate(sorted(active, key=lambda f: f.track_id), ended)

    def finish(self) -> list[int]:
        """End every confirmed track and return their ids: at the end of a stream, or at a scene cut (where IoU alone
        would hand a vanished face's id to a new face overlapping its old box)."""
        ended = sorted(tr.track_id for tr in self.tracks if tr.track_id is not None)
        self.tracks = []
        return ended
