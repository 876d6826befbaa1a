"""Scoring: aligned crops -> dense and twin embeddings -> PreFIQs drift D (Q = 1 - D/2) -> the selection score.

The selection score (what the selector ranks by) is a `Selection` hook that the service wires in from
agent/quality/selection.py: it fuses PreFIQs with the other evidence of the same pass (ERS of the dense embedding,
the dense pass's activation statistics, the detector's confidence and box size, the crop's face-region brightness).
Without a hook, quality is PreFIQs' Q.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from agent.backends.pairs import EmbeddingPair, build_pair
from agent.common.fr_spec import FRSpec, preprocess
from agent.common.images import face_grey
from agent.types import Scored
from engines.prepare import PreparedFR, prepare_fr
from engines.trt_build import EngineOptions

log = logging.getLogger(__name__)


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prefiqs(dense: np.ndarray, twin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quality, drift, normalised dense embeddings) for a batch of raw embeddings."""
    d, t = l2n(dense), l2n(twin)
    drift = np.linalg.norm(d - t, axis=1)
    return 1.0 - drift / 2.0, drift, d


@dataclass
class Evidence:
    """What one scoring pass knows of a batch of faces, for the selection score."""

    drift: np.ndarray  # (N,) PreFIQs drift
    dense: np.ndarray  # (N, d) L2-normalised dense embeddings
    stats: dict[str, np.ndarray]  # activation statistics by output name (empty where the backend has none)
    det_score: np.ndarray  # (N,) detector confidence, NaN where unknown (aligned crops given as they are)
    det_size: np.ndarray  # (N,) detection size (frame pixels), NaN where unknown
    brightness: np.ndarray  # (N,) log(1 + mean grey) of the crop's eyes-to-mouth region (`face_brightness`), or NaN


def face_brightness(crops: Sequence[np.ndarray]) -> np.ndarray:
    """log(1 + mean grey level) of each aligned crop's inner face region (`face_grey`), the selection score's
    brightness cue."""
    return np.log1p(np.array([face_grey(c) for c in crops], np.float64))


def _known(values: Sequence[float] | None, n: int) -> np.ndarray:
    return np.full(n, np.nan) if values is None else np.asarray(values, np.float64)


class Selection(Protocol):
    """Evidence -> (selection score in [0, 1] per face, the named ingredients per face)."""

    def __call__(self, ev: Evidence) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...


class Scorer:
    """Scores aligned crops in batches of at most `max_batch`; `selection` (None: PreFIQs) makes `quality`."""

    def __init__(self, spec: FRSpec, pair: EmbeddingPair, max_batch: int = 32, model_id: str = "",
                 selection: Selection | None = None):
        self.spec, self.pair, self.max_batch = spec, pair, max_batch
        self.model_id = model_id or spec.name
        self.selection = selection

    def evidence(self, crops: Sequence[np.ndarray], det_scores: Sequence[float] | None = None,
                 det_sizes: Sequence[float] | None = None) -> Evidence:
        """One forward pass over at most `max_batch` crops."""
        return self.evidence_of(preprocess(list(crops), self.spec), det_scores, det_sizes, face_brightness(crops))

    def evidence_of(self, batch: np.ndarray, det_scores: Sequence[float] | None = None,
                    det_sizes: Sequence[float] | None = None, brightness: np.ndarray | None = None) -> Evidence:
        """One forward pass over a preprocessed batch."""
        f = self.pair.forward(batch)
        _, drift, dense = prefiqs(f.dense, f.twin)
        n = len(batch)
        return Evidence(drift, dense, f.stats, _known(det_scores, n), _known(det_sizes, n), _known(brightness, n))

    def score(self, crops: Sequence[np.ndarray], det_scores: Sequence[float] | None = None,
              det_sizes: Sequence[float] | None = None) -> list[Scored]:
        """`det_scores`, `det_sizes`: the detections' confidence and size (None: unknown, neutral cues)."""
        out: list[Scored] = []
        for i in range(0, len(crops), self.max_batch):
            part = slice(i, i + self.max_batch)
            ev = self.evidence(crops[part], None if det_scores is None else det_scores[part],
                               None if det_sizes is None else det_sizes[part])
            pq = 1.0 - ev.drift / 2.0
            q, cues = self.selection(ev) if self.selection is not None else (pq, {})
            out.extend(Scored(float(q[j]), float(ev.drift[j]), ev.dense[j], float(pq[j]),
                              {k: float(v[j]) for k, v in cues.items()}) for j in range(len(ev.drift)))
        return out


@dataclass(frozen=True)
class Int8Calibration:
    """Aligned crops to calibrate INT8 activation ranges on (`crops(spec)`), and a name for them that changes
    whenever they do (it names the quantized graph)."""

    name: str
    crops: Callable[[FRSpec], list[np.ndarray]]

    def prepare(self, prepared: PreparedFR) -> PreparedFR:
        """`prepared` with its pair graph quantized on these crops (engines/int8.py; made once, then reused)."""
        from engines.int8 import prepare_int8

        return prepare_int8(prepared, lambda: preprocess(self.crops(prepared.spec), prepared.spec), self.name)


def build_scorer(
    spec: FRSpec,
    recipe: str | None = None,
    form: str = "trunk",
    threads: int | None = None,
    max_batch: int = 32,
    cache: Path | None = None,
    backend: str = "auto",
    engines: EngineOptions | None = None,
    int8: Int8Calibration | None = None,
) -> tuple[Scorer, PreparedFR]:
    """The scorer and its prepared model. `int8`: score with the INT8 copy of the shared-trunk graph (engines/int8.py)
    on ONNX Runtime's CPU backend, calibrated on those crops; None: FP32 on `backend`."""
    prepared = prepare_fr(spec, recipe, cache)
    model_id = f"{spec.name}:{prepared.manifest['dense_sha256'][:12]}:{prepared.recipe}"
    if int8 is not None:
        if form != "trunk" or backend not in ("auto", "onnxruntime"):
            raise ValueError(f"precision int8 runs the shared-trunk graph on the onnxruntime (CPU) backend, not form "
                             f"{form!r} on backend {backend!r}")
        prepared = int8.prepare(prepared)
        model_id, backend = f"{model_id}:int8", "onnxruntime"
    pair = build_pair(prepared, form, threads, backend, engines)
    return Scorer(spec, pair, max_batch, model_id), prepared
