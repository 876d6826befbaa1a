"""Face quality methods other than PreFIQs, for the evaluations (docs/QUALITY.md).

Every method maps faces to one number each, higher = better:
- random: seeded uniform noise (the floor any method must beat);
- size: the shorter side of the detector box in frame pixels (the "largest face" heuristic);
- sharpness: variance of the Laplacian of the grey ArcFace-template crop (agent.pipeline.select.sharpness);
- detector: the detector's confidence;
- lightqnet: LightQNet (Chen et al. 2021), a small CNN trained to predict FR utility, run with ONNX Runtime on its
  own 3-point alignment (eyes and mouth centre onto a 160 px template, resized to 96 px, BGR, (x - 128) / 128);
- oracle: the true utility (a pair's comparison score, or a frame's similarity to the enrolment), the ceiling;
- rank fusion: the mean of several methods' normalised ranks.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from scipy.stats import rankdata

from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.pipeline.align import similarity
from agent.types import Detection

# LightQNet's template: image-left eye, image-right eye, mouth centre, in % of a 160 px crop (its demo code).
LIGHTQNET_TEMPLATE = np.array([[34.19, 46.16], [65.65, 45.98], [50.12, 82.40]], np.float32)
LIGHTQNET_SIZE = 96


def random_quality(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def lightqnet_crop(image: np.ndarray, det: Detection) -> np.ndarray:
    """The 96x96 BGR crop LightQNet expects (its 3-point alignment; the detector box when there are no landmarks)."""
    size = LIGHTQNET_SIZE
    if det.landmarks is not None:
        lm = det.landmarks
        src = np.stack([lm[0], lm[1], (lm[3] + lm[4]) / 2]).astype(np.float32)
        m = similarity(src, LIGHTQNET_TEMPLATE * (size / 100.0))
    else:
        x1, y1, x2, y2 = (float(v) for v in det.bbox)
        side = max(x2 - x1, y2 - y1)
        m = np.array([[size / side, 0, -x1 * size / side], [0, size / side, -y1 * size / side]], np.float32)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class LightQNet:
    """LightQNet ONNX (input NHWC 96x96 BGR, output a sigmoid confidence)."""

    def __init__(self, path: str | Path, threads: int | None = None, max_batch: int = 64):
        self.backend = OnnxRuntimeBackend(path, threads)
        self.max_batch = max_batch

    def score(self, crops: list[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(crops), self.max_batch):
            x = (np.stack(crops[i : i + self.max_batch]).astype(np.float32) - 128.0) / 128.0
            out.append(next(iter(self.backend.run(x).values())).reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def normalised_rank(q: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share their mean rank)."""
    q = np.asarray(q, np.float64)
    return (rankdata(q) - 1) / max(len(q) - 1, 1)


def rank_fusion(*qualities: np.ndarray) -> np.ndarray:
    """The mean of the methods' normalised ranks over the same faces."""
    return np.mean([normalised_rank(q) for q in qualities], axis=0)
