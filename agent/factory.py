"""Builds the runtime stages from specs: prepared models, chosen backend, scorer."""

from __future__ import annotations

import logging
from pathlib import Path

from agent.backend import OnnxRuntimeBackend
from agent.models import FRSpec
from agent.score import EmbeddingPair, Scorer, SeparateTwins, SharedTrunk
from engines.prepare import DEFAULT_RECIPE, PreparedFR, prepare_fr

log = logging.getLogger(__name__)


def build_pair(prepared: PreparedFR, form: str = "trunk", threads: int | None = None) -> EmbeddingPair:
    """form: "trunk" (one shared-trunk graph) or "separate" (dense and twin models)."""
    if form == "trunk":
        return SharedTrunk(OnnxRuntimeBackend(prepared.pair, threads))
    if form == "separate":
        return SeparateTwins(OnnxRuntimeBackend(prepared.dense, threads), OnnxRuntimeBackend(prepared.twin, threads))
    raise ValueError(f"unknown scoring form {form!r}: use 'trunk' or 'separate'")


def build_scorer(
    spec: FRSpec,
    recipe: str = DEFAULT_RECIPE,
    form: str = "trunk",
    threads: int | None = None,
    max_batch: int = 32,
    cache: Path | None = None,
) -> tuple[Scorer, PreparedFR]:
    prepared = prepare_fr(spec, recipe, cache)
    model_id = f"{spec.name}:{prepared.manifest['dense_sha256'][:12]}:{prepared.recipe}"
    return Scorer(spec, build_pair(prepared, form, threads), max_batch, model_id), prepared
