"""Builds the runtime stages from specs: prepared models, chosen backend, scorer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from agent.backend import OnnxRuntimeBackend, OnnxRuntimeCudaBackend, require_cuda_provider, select_backend
from agent.models import FRSpec
from agent.score import EmbeddingPair, Scorer, SeparateTwins, SharedTrunk
from engines.prepare import PreparedFR, prepare_fr
from engines.trt_build import EngineOptions

log = logging.getLogger(__name__)

FORMS = ("trunk", "separate")


def build_pair(prepared: PreparedFR, form: str = "trunk", threads: int | None = None, backend: str = "auto",
               engines: EngineOptions | None = None, graph_batches: Sequence[int] = ()) -> EmbeddingPair:
    """form: "trunk" (one shared-trunk graph) or "separate" (dense and twin models); TensorRT always runs the
    dense and the 2:4-sparse engine. backend: auto | tensorrt | onnxruntime-cuda | onnxruntime (see
    agent.backend.select_backend). engines, graph_batches: TensorRT's build options and CUDA-graph batch sizes."""
    if form not in FORMS:
        raise ValueError(f"unknown scoring form {form!r}: use 'trunk' or 'separate'")

    def onnxruntime() -> EmbeddingPair:
        if form == "trunk":
            return SharedTrunk(OnnxRuntimeBackend(prepared.pair, threads))
        return SeparateTwins(OnnxRuntimeBackend(prepared.dense, threads), OnnxRuntimeBackend(prepared.twin, threads))

    def onnxruntime_cuda() -> EmbeddingPair:
        from engines.fp16 import fp16_model_path

        require_cuda_provider()  # before the FP16 export, which is wasted where CUDA cannot run
        if form == "trunk":
            return SharedTrunk(OnnxRuntimeCudaBackend(fp16_model_path(prepared.pair)))
        return SeparateTwins(OnnxRuntimeCudaBackend(fp16_model_path(prepared.dense)),
                             OnnxRuntimeCudaBackend(fp16_model_path(prepared.twin)))

    def tensorrt() -> EmbeddingPair:
        from agent.trt_runtime import tensorrt_pair

        return tensorrt_pair(prepared, engines, graph_batches)

    name, pair = select_backend(backend, {"tensorrt": tensorrt, "onnxruntime-cuda": onnxruntime_cuda,
                                          "onnxruntime": onnxruntime})
    log.info("scoring on %s (%s)", name, "dense + sparse engines" if name == "tensorrt" else form)
    return pair


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
