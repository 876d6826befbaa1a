"""Inference backends behind one small interface, so the pipeline does not know which runs.

A backend runs one ONNX model (or a TensorRT engine built from it) on a float32 batch and returns
its named outputs. ONNX Runtime is the CPU default; ONNX Runtime's CUDA provider (FP16 model) and TensorRT
(agent/trt_runtime.py) are the GPU ones. `select_backend` picks one: `auto` tries TensorRT, then ONNX
Runtime CUDA, then ONNX Runtime on the CPU, logging one line per backend it skips and why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
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


def default_threads() -> int:
    env = os.environ.get("BESTSHOT_THREADS")
    return int(env) if env else max(1, os.cpu_count() or 1)


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU (or on CUDA with `providers`)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None,
                 providers: list[str | tuple[str, dict]] | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about declared-vs-actual output shapes are noise here
        # Detector and scorer sessions run at once on different threads: idle pool threads must not spin.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return dict(zip(self.output_names, outs, strict=True))


class OnnxRuntimeCudaBackend(OnnxRuntimeBackend):
    """ONNX Runtime on CUDA (onnxruntime-gpu, the `cuda` extra), meant for the FP16 export (engines/fp16.py)."""

    name = "onnxruntime-cuda"

    def __init__(self, path: str | Path, device_id: int = 0):
        require_cuda_provider()
        super().__init__(path, providers=[("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"])
        if self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable("onnxruntime's CUDAExecutionProvider did not start: no CUDA device, or CUDA/cuDNN "
                                     "libraries missing (see onnxruntime's warnings)")


def require_cuda_provider() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu: the `cuda` extra)")


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
    for name in AUTO_ORDER:
        try:
            made = makers[name]()
        except BackendUnavailable as e:
            log.log(logging.WARNING if e.failed else logging.INFO, "backend auto: skipping %s: %s", name, e)
            continue
        log.info("backend auto: using %s", name)
        return name, made
    raise BackendUnavailable("backend auto: no backend can run here")
