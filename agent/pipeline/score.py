"""PreFIQs scoring: aligned crops -> dense and twin embeddings -> drift D and quality Q = 1 - D/2."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.backends.pairs import EmbeddingPair, build_pair
from agent.common.fr_spec import FRSpec, preprocess
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


def build_scorer(
    spec: FRSpec,
    recipe: str | None = None,
    form: str = "trunk",
    threads: int | None = None,
    max_batch: int = 32,
    cache: Path | None = None,
    backend: str = "auto",
    engines: EngineOptions | None = None,
) -> tuple[Scorer, PreparedFR]:
    prepared = prepare_fr(spec, recipe, cache)
    model_id = f"{spec.name}:{prepared.manifest['dense_sha256'][:12]}:{prepared.recipe}"
    pair = build_pair(prepared, form, threads, backend, engines)
    return Scorer(spec, pair, max_batch, model_id), prepared
