"""Small typed records passed between the pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detection:
    """One face found in one frame, in that frame's pixel coordinates.

    landmarks: (5, 2) float32, ArcFace order: the person's right eye (image-left), left eye,
    nose tip, right mouth corner, left mouth corner. None when the detector gives none.
    """

    bbox: np.ndarray  # (4,) float32: x1, y1, x2, y2
    score: float
    landmarks: np.ndarray | None = None

    @property
    def size(self) -> float:
        """Face size in pixels: the shorter side of the box."""
        return float(min(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]))


@dataclass
class Frame:
    """A decoded frame with its timing, as a source hands it on."""

    camera: str
    index: int  # frame number within the source, from 0
    pts: float  # presentation time in seconds
    image: np.ndarray  # HxWx3 uint8 BGR
    wall_time: float = 0.0  # time.time() when decoded


@dataclass
class Scored:
    """What the scorer says of one aligned crop."""

    quality: float  # the selection score in [0, 1], higher is better (agent/quality/selection.py); PreFIQs without one
    drift: float  # D = ||e_dense - e_twin||_2 of the L2-normalised embeddings
    embedding: np.ndarray = field(repr=False)  # dense embedding, L2-normalised float32
    prefiqs: float | None = None  # PreFIQs Q = 1 - D/2 (filled in from drift when not given)
    cues: dict[str, float] = field(default_factory=dict)  # the selection score's ingredients, by name

    def __post_init__(self) -> None:
        if self.prefiqs is None:
            self.prefiqs = 1.0 - self.drift / 2.0


@dataclass
class TrackedFace:
    """A detection with the identity of the track it belongs to (from our tracker or from upstream)."""

    track_id: int
    det: Detection


@dataclass
class BestShot:
    """What the selector hands the publisher when a track ends (or on an update)."""

    camera: str
    track_id: int
    status: str  # "best" | "unrecognisable" (best quality below the minimum) | "update" (track still open)
    first_seen: float  # pts seconds
    best_time: float
    last_seen: float
    frame_index: int
    bbox: np.ndarray
    landmarks: np.ndarray | None
    det_score: float
    quality: float  # the selection score (Scored.quality)
    drift: float
    prefiqs: float  # PreFIQs Q = 1 - drift / 2
    frames_seen: int
    frames_scored: int
    model_id: str
    crop: np.ndarray = field(repr=False)  # aligned face, BGR uint8
    context: np.ndarray = field(repr=False)  # box with margin, BGR uint8
    embedding: np.ndarray = field(repr=False)  # dense, L2-normalised float32
    extra: dict = field(default_factory=dict)  # optional fields (top-K, ERS, template, ...)
