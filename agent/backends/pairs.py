"""The dense model and its pruned twin as one running pair: one place that turns a prepared model into the
pair on the backend that can run here (callers never pick a backend by hand)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from agent.backends.base import Backend, Forward, PairBase, select_backend
from agent.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeCudaBackend, require_cuda_provider
from engines.prepare import PreparedFR
from engines.trt_build import EngineOptions

log = logging.getLogger(__name__)


class EmbeddingPair(Protocol):
    """Computes the dense and the pruned-twin embedding of one preprocessed batch (`forward` adds the activation
    statistics where the form reports them)."""

    def forward(self, batch: np.ndarray) -> Forward: ...

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class SharedTrunk(PairBase):
    """One model whose first two outputs are dense and twin (the layers before the first pruned one run once);
    further outputs are the dense pass's activation statistics."""

    def __init__(self, backend: Backend):
        if len(backend.output_names) < 2:
            raise ValueError(f"the shared-trunk model needs 2 outputs or more, has {backend.output_names}")
        self.backend = backend

    def forward(self, batch: np.ndarray) -> Forward:
        out = self.backend.run(batch)
        dense, twin, *stats = self.backend.output_names
        return Forward(out[dense], out[twin], {n: out[n] for n in stats})


class SeparateTwins(PairBase):
    """The dense model and the pruned twin as two models (no activation statistics)."""

    def __init__(self, dense: Backend, twin: Backend):
        self.dense, self.twin = dense, twin

    def forward(self, batch: np.ndarray) -> Forward:
        dense = self.dense.run(batch)[self.dense.output_names[0]]
        return Forward(dense, self.twin.run(batch)[self.twin.output_names[0]])


FORMS = ("trunk", "separate")


def build_pair(prepared: PreparedFR, form: str = "trunk", threads: int | None = None, backend: str = "auto",
               engines: EngineOptions | None = None, graph_batches: Sequence[int] = ()) -> EmbeddingPair:
    """form: "trunk" (one shared-trunk graph) or "separate" (dense and twin models); TensorRT always runs the
    split engines (dense, then the 2:4-sparse branch on its device buffer). backend: auto | tensorrt |
    onnxruntime-cuda | onnxruntime (see agent.backends.base.select_backend). engines, graph_batches: TensorRT's build
    options and CUDA-graph batch sizes."""
    if form not in FORMS:
        raise ValueError(f"unknown scoring form {form!r}: use 'trunk' or 'separate'")

    def onnxruntime() -> EmbeddingPair:
        if form == "trunk":
            return SharedTrunk(OnnxRuntimeBackend(prepared.pair, threads))
        return SeparateTwins(OnnxRuntimeBackend(prepared.dense, threads), OnnxRuntimeBackend(prepared.twin, threads))

    def onnxruntime_cuda() -> EmbeddingPair:
        require_cuda_provider()  # before the FP16 export (and its onnx import), wasted where CUDA cannot run
        from engines.fp16 import fp16_model_path

        if form == "trunk":
            return SharedTrunk(OnnxRuntimeCudaBackend(fp16_model_path(prepared.pair)))
        return SeparateTwins(OnnxRuntimeCudaBackend(fp16_model_path(prepared.dense)),
                             OnnxRuntimeCudaBackend(fp16_model_path(prepared.twin)))

    def tensorrt() -> EmbeddingPair:
        from agent.backends.tensorrt import tensorrt_pair

        return tensorrt_pair(prepared, engines, graph_batches)

    name, pair = select_backend(backend, {"tensorrt": tensorrt, "onnxruntime-cuda": onnxruntime_cuda,
                                          "onnxruntime": onnxruntime})
    log.info("scoring on %s (%s)", name, "dense + sparse branch engines" if name == "tensorrt" else form)
    return pair
