"""Seeded image degradations for the quality evaluations (docs/QUALITY.md, "degraded-probe protocol").

Every degradation takes a BGR uint8 frame, a severity in [0, 1] (0 = the untouched image) and a seed, and is a
pure function of the three (and of the face box, for the two that act on the face): the same call gives the same
pixels. It returns the degraded frame and the 3x3 homography mapping input pixels to output pixels, so the face
box and landmarks of the clean frame can be carried over (only `downscale` and `pose` move pixels).

Severity 1 is meant to be hard but not always hopeless; the parameters at severity s:
- blur: Gaussian, sigma = 0.3 + 3.7 s px
- motion: a line kernel of 1 + 20 s px at a random angle
- downscale: the frame shrinks by 1 + 6 s (a 250 px LFW image becomes 36 px): the face really has fewer pixels
- noise: additive Gaussian, sigma = 3 + 37 s grey levels
- jpeg: re-encoded at quality 50 - 45 s
- lowlight: brightness x (1 - 0.88 s), gamma 1 + s, then sensor noise sigma 1 + 4 s, quantised to 8 bits
- occlusion: a flat random-grey rectangle covering 10 + 45 s % of the face box, at a random place in it
- pose: a perspective warp of the face box (one side shrinks vertically by 50 s % and moves in by 40 s % of the
  width, left or right at random; a yaw-like foreshortening that alignment cannot undo)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

KINDS = ("blur", "motion", "downscale", "noise", "jpeg", "lowlight", "occlusion", "pose")


@dataclass(frozen=True)
class Degradation:
    kind: str
    severity: float
    seed: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.severity:.2f}#{self.seed}"


def _box(image: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """The face box, or the central half of the frame when none is given."""
    if box is not None:
        return np.asarray(box, np.float32)
    h, w = image.shape[:2]
    return np.array([w / 4, h / 4, 3 * w / 4, 3 * h / 4], np.float32)


def degrade(image: np.ndarray, d: Degradation, box: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(degraded BGR uint8 frame, 3x3 homography input px -> output px). `box`: the face, xyxy."""
    if d.kind not in KINDS:
        raise ValueError(f"unknown degradation {d.kind!r}; one of {', '.join(KINDS)}")
    if not 0.0 <= d.severity <= 1.0:
        raise ValueError(f"severity {d.severity} outside [0, 1]")
    s, rng, eye = float(d.severity), np.random.default_rng(d.seed), np.eye(3)
    img = image
    if s == 0.0:
        return img.copy(), eye
    if d.kind == "blur":
        return cv2.GaussianBlur(img, (0, 0), 0.3 + 3.7 * s), eye
    if d.kind == "motion":
        n = int(round(1 + 20 * s)) | 1
        k = np.zeros((n, n), np.float32)
        k[n // 2] = 1.0
        rot = cv2.getRotationMatrix2D(((n - 1) / 2, (n - 1) / 2), float(rng.uniform(0, 180)), 1.0)
        k = cv2.warpAffine(k, rot, (n, n))
        return cv2.filter2D(img, -1, k / max(k.sum(), 1e-6), borderType=cv2.BORDER_REFLECT), eye
    if d.kind == "downscale":
        f = 1.0 / (1.0 + 6.0 * s)
        h, w = img.shape[:2]
        nw, nh = max(8, round(w * f)), max(8, round(h * f))
        return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA), np.diag([nw / w, nh / h, 1.0])
    if d.kind == "noise":
        noisy = img + rng.normal(0, 3 + 37 * s, img.shape)
        return np.clip(noisy, 0, 255).round().astype(np.uint8), eye
    if d.kind == "jpeg":
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(round(50 - 45 * s))])
        return cv2.imdecode(buf, cv2.IMREAD_COLOR), eye
    if d.kind == "lowlight":
        x = (img / 255.0) ** (1.0 + s) * 255.0 * (1.0 - 0.88 * s)
        x = x + rng.normal(0, 1 + 4 * s, img.shape)
        return np.clip(x, 0, 255).round().astype(np.uint8), eye
    x1, y1, x2, y2 = _box(img, box)
    bw, bh = x2 - x1, y2 - y1
    if d.kind == "occlusion":
        area = (0.10 + 0.45 * s) * bw * bh
        aspect = rng.uniform(0.5, 2.0)
        ow, oh = min(bw, np.sqrt(area * aspect)), min(bh, np.sqrt(area / aspect))
        ox, oy = x1 + rng.uniform(0, bw - ow), y1 + rng.uniform(0, bh - oh)
        out = img.copy()
        grey = int(rng.integers(0, 256))
        cv2.rectangle(out, (int(ox), int(oy)), (int(ox + ow), int(oy + oh)), (grey, grey, grey), -1)
        return out, eye
    # pose: one vertical side of the face box shrinks towards the box's middle height and moves inwards
    src = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32)
    dst = src.copy()
    squeeze, shift = 0.25 * s * bh, 0.4 * s * bw
    side = (1, 2) if rng.random() < 0.5 else (0, 3)
    sign = -1.0 if side == (1, 2) else 1.0
    dst[side[0]] += (sign * shift, squeeze)
    dst[side[1]] += (sign * shift, -squeeze)
    m = cv2.getPerspectiveTransform(src, dst)
    h, w = img.shape[:2]
    return cv2.warpPerspective(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), m


def random_degradation(rng: np.random.Generator, kinds: tuple[str, ...] = KINDS) -> Degradation:
    """A degradation of a kind drawn uniformly from `kinds` at a severity drawn uniformly from [0, 1]."""
    return Degradation(str(rng.choice(kinds)), float(rng.uniform(0.0, 1.0)), int(rng.integers(2**31)))


def map_points(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points (n, 2) through a 3x3 homography."""
    p = np.asarray(pts, np.float64).reshape(-1, 2)
    q = np.c_[p, np.ones(len(p))] @ h.T
    return (q[:, :2] / q[:, 2:3]).astype(np.float32)


def map_box(h: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The xyxy box around the mapped corners of a box."""
    x1, y1, x2, y2 = np.asarray(box, np.float64)
    q = map_points(h, np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]))
    return np.r_[q.min(0), q.max(0)].astype(np.float32)
