"""Alignment: a face in a frame -> a crop in the FR model's template."""

from __future__ import annotations

import cv2
import numpy as np

from agent.common.fr_spec import FRSpec
from agent.types import Detection


def similarity(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """2x3 similarity transform (rotation, uniform scale, shift) mapping landmarks onto the template."""
    m, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template, method=cv2.LMEDS)
    if m is None:  # LMedS found no consensus: plain least squares (OpenCV 5 has no method=0 here)
        from skimage.transform import SimilarityTransform

        t = SimilarityTransform.from_estimate(landmarks.astype(np.float64), template.astype(np.float64))
        if not t or not np.isfinite(t.params).all():
            raise ValueError("landmarks are degenerate: no similarity transform fits them")
        m = t.params[:2].astype(np.float64)
    return m


def box_transform(bbox: np.ndarray, size: int, margin: float, landmarks: np.ndarray | None = None) -> np.ndarray:
    """2x3 transform mapping a square around the box (with margin) onto a size x size crop, turned
    upright by the eye line when landmarks are given."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    side = max(x2 - x1, y2 - y1) * (1.0 + margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    angle = 0.0
    if landmarks is not None:
        (ax, ay), (bx, by) = landmarks[0], landmarks[1]
        angle = float(np.degrees(np.arctan2(by - ay, bx - ax)))
    m = cv2.getRotationMatrix2D((cx, cy), angle, size / max(side, 1.0))
    m[:, 2] += (size / 2 - cx, size / 2 - cy)
    return m


def align(image: np.ndarray, det: Detection, spec: FRSpec) -> np.ndarray:
    """The aligned crop (BGR uint8, input_size square): template alignment when the spec asks for it and
    landmarks exist, else the (upright) box crop."""
    size = spec.input_size
    if spec.crop == "template" and det.landmarks is not None:
        m = similarity(det.landmarks, spec.template_px())
    else:
        m = box_transform(det.bbox, size, spec.margin, det.landmarks)
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def context_crop(image: np.ndarray, bbox: np.ndarray, margin: float = 0.5) -> np.ndarray:
    """The face box with a margin of context around it, clipped to the image."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in bbox)
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    xa, ya = max(0, int(x1 - mx)), max(0, int(y1 - my))
    xb, yb = min(w, int(np.ceil(x2 + mx))), min(h, int(np.ceil(y2 + my)))
    if xb <= xa or yb <= ya:
        raise ValueError(f"box {bbox.tolist()} lies outside the {w}x{h} image")
    return image[ya:yb, xa:xb].copy()
