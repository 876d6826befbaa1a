"""ONNX Runtime backends: the CPU default, and the CUDA provider for the FP16 export."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.backends.base import BackendUnavailable, default_threads


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
