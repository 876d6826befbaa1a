"""ONNX Runtime backends: the CPU default, and the CUDA provider for the FP16 export.

Every run goes through I/O binding: the batch is placed on the session's device once (an OrtValue) and the
outputs are allocated there by ONNX Runtime, then copied back; on CUDA cuDNN picks convolution algorithms by
heuristic (the default exhaustive search stalls on every new batch size)."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from pathlib import Path

import numpy as np

from agent.backends.base import BackendUnavailable, default_threads

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "onnxruntime-gpu")  # the `cpu` and `cuda` extras: one module, so exactly one of them
COLLISION = ("onnxruntime and onnxruntime-gpu are both installed; they install the same `onnxruntime` module, so "
             "the one installed last won and CUDA may be gone: `pip uninstall -y onnxruntime onnxruntime-gpu`, then "
             "install bestshot with one of the extras `cpu` or `cuda`")


def installed_runtimes() -> list[str]:
    """Which of RUNTIMES pip has installed (from their distribution metadata, not the shared module)."""
    found = []
    for dist in RUNTIMES:
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


@functools.cache
def check_runtime() -> None:
    """Once per process: none installed is an error naming the extras; both installed is a warning."""
    found = installed_runtimes()
    if not found:
        raise BackendUnavailable("no ONNX Runtime installed: install bestshot with the extra `cpu` (or `cuda`)")
    if len(found) > 1:
        log.warning("%s", COLLISION)


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU (or on CUDA with `providers`)."""

    name = "onnxruntime"
    device = ("cpu", 0)  # where inputs and outputs are bound (OrtValue device type, id)

    def __init__(self, path: str | Path, threads: int | None = None,
                 providers: list[str | tuple[str, dict]] | None = None):
        check_runtime()
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
        import onnxruntime as ort

        binding = self.session.io_binding()
        x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch, np.float32), *self.device)
        binding.bind_ortvalue_input(self.input_name, x)
        for name in self.output_names:
            binding.bind_output(name, *self.device)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))


class OnnxRuntimeCudaBackend(OnnxRuntimeBackend):
    """ONNX Runtime on CUDA (onnxruntime-gpu, the `cuda` extra), meant for the FP16 export (engines/fp16.py)."""

    name = "onnxruntime-cuda"

    def __init__(self, path: str | Path, device_id: int = 0):
        require_cuda_provider()
        self.device = ("cuda", device_id)
        super().__init__(path, providers=[("CUDAExecutionProvider", cuda_options(device_id)), "CPUExecutionProvider"])
        if self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable("onnxruntime's CUDAExecutionProvider did not start: no CUDA device, or CUDA/cuDNN "
                                     "libraries missing (see onnxruntime's warnings)")


def cuda_options(device_id: int) -> dict[str, str]:
    """CUDAExecutionProvider options: cuDNN's heuristic algorithm choice (no exhaustive search per new shape)."""
    return {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC"}


def require_cuda_provider() -> None:
    check_runtime()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        if len(installed_runtimes()) > 1:
            raise BackendUnavailable(COLLISION, failed=True)
        raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu: the `cuda` extra)")
