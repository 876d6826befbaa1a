"""PreFIQs scoring: aligned crops -> dense and twin embeddings -> drift D and quality Q = 1 - D/2."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from agent.backend import Backend
from agent.models import FRSpec, preprocess
from agent.types import Scored

log = logging.getLogger(__name__)


class EmbeddingPair(Protocol):
    """Computes the dense and the pruned-twin embedding of one preprocessed batch."""

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class SharedTrunk:
    """One model with two outputs (dense, twin): the layers before the first pruned one run once."""

    def __init__(self, backend: Backend):
        if len(backend.output_names) != 2:
            raise ValueError(f"the shared-trunk model needs 2 outputs, has {backend.output_names}")
        self.backend = backend

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.backend.run(batch)
        dense, twin = (out[n] for n in self.backend.output_names)
        return dense, twin


class SeparateTwins:
    """The dense model and the pruned twin as two models (the form TensorRT's sparse engine takes)."""

    def __init__(self, dense: Backend, twin: Backend):
        self.dense, self.twin = dense, twin

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = self.dense.run(batch)[self.dense.output_names[0]]
        t = self.twin.run(batch)[self.twin.output_names[0]]
        return d, t


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prefiqs(dense: np.ndarray, twin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quality, drift, normalised dense embeddings) for a batch of raw embeddings."""
    d, t = l2n(dense), l2n(twin)
    drift = np.linalg.norm(d - t, axis=1)
    return 1.0 - drift / 2.0, drift, d


class Scorer:
    """Scores aligned crops in batches of at most `max_batch`."""

    def __init__(self, spec: FRSpec, pair: EmbeddingPair, max_batch: int = 32, model_id: str = ""):
        self.spec, self.pair, self.max_batch = spec, pair, max_batch
        self.model_id = model_id or spec.name

    def score(self, crops: Sequence[np.ndarray]) -> list[Scored]:
        out: list[Scored] = []
        for i in range(0, len(crops), self.max_batch):
            chunk = list(crops[i : i + self.max_batch])
            q, dr, emb = prefiqs(*self.pair.embed(preprocess(chunk, self.spec)))
            out.extend(Scored(float(a), float(b), e) for a, b, e in zip(q, dr, emb, strict=True))
        return out
