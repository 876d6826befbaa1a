"""Inference backends behind one small interface, so the pipeline does not know which runs.

A backend runs one ONNX model (or a TensorRT engine built from it) on a float32 batch and returns
its named outputs. ONNX Runtime is the CPU default; the GPU backends plug in here too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


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

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about declared-vs-actual output shapes are noise here
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return dict(zip(self.output_names, outs, strict=True))
