"""Inference backends behind one small interface, so the pipeline does not know which runs.

A backend runs one ONNX model (or a TensorRT engine built from it) on a float32 batch and returns
its named outputs. ONNX Runtime (onnxruntime.py) is the CPU default; ONNX Runtime's CUDA provider (FP16 model)
and TensorRT (tensorrt.py) are the GPU ones. `select_backend` picks one: `auto` tries TensorRT, then ONNX
Runtime CUDA, then ONNX Runtime on the CPU, logging one line per backend it skips and why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime")
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "onnxruntime")
T = TypeVar("T")


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why in one line. `failed`: it is installed but broke
    (engine build failed, runtime error), as opposed to simply absent (no GPU, no TensorRT)."""

    def __init__(self, reason: str, failed: bool = False):
        super().__init__(reason)
        self.failed = failed


class Backend(Protocol):
    """Runs one model. `run` takes the input batch and returns every output, by name."""

    name: str
    input_name: str
    output_names: list[str]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass
class Forward:
    """One batch through the dense model and its twin: both raw embeddings and, where the form reports them, the
    dense pass's activation statistics by output name (engines/twin.py: `stats/<i>/mean`, `stats/<i>/meansq`)."""

    dense: np.ndarray
    twin: np.ndarray
    stats: dict[str, np.ndarray] = field(default_factory=dict)


class PairBase:
    """`embed` for every pair: the two embeddings of `forward`."""

    def forward(self, batch: np.ndarray) -> Forward:
        raise NotImplementedError

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = self.forward(batch)
        return f.dense, f.twin


def default_threads() -> int:
    env = os.environ.get("BESTSHOT_THREADS")
    return int(env) if env else max(1, os.cpu_count() or 1)


def select_backend(requested: str, makers: Mapping[str, Callable[[], T]]) -> tuple[str, T]:
    """Make the requested backend's object, or for `auto` the first of AUTO_ORDER that can run here.

    Each maker raises BackendUnavailable when its backend cannot run. `auto` logs one line per skipped backend
    (INFO when absent, WARNING when it failed); an explicit request that cannot be met raises BackendUnavailable.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}: use one of {', '.join(BACKENDS)}")
    if requested != "auto":
        try:
            return requested, makers[requested]()
        except BackendUnavailable as e:
            raise BackendUnavailable(f"backend {requested!r} was requested but cannot run here: {e}", e.failed) from e
    skipped = []
    for name in AUTO_ORDER:
        try:
            made = makers[name]()
        except BackendUnavailable as e:
            log.log(logging.WARNING if e.failed else logging.INFO, "backend auto: skipping %s: %s", name, e)
            skipped.append(f"{name}: {e}")
            continue
        log.info("backend auto: using %s", name)
        return name, made
    raise BackendUnavailable(f"backend auto: no backend can run here ({'; '.join(skipped)})")
