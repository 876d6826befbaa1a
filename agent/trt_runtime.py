"""TensorRT runtime on pycuda: the dense and the sparse engine fed from one upload of the batch.

One CUDA context (the device's primary context, the one TensorRT's runtime uses), page-locked host buffers
and device buffers sized for the profile's largest batch, one stream; per batch `set_input_shape`,
`set_tensor_address` and `execute_async_v3` on each engine. Optionally a CUDA graph per fixed batch size
(upload, both engines, downloads: one launch). pycuda and tensorrt are imported lazily: this module loads
on machines without either.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.backend import BackendUnavailable
from engines.prepare import PreparedFR
from engines.trt_build import EngineError, EngineMismatch, EngineOptions, Profile, build_engines

log = logging.getLogger(__name__)


class GpuUnavailable(BackendUnavailable):
    """No CUDA GPU (or no driver) on this machine."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"


def parse_nvidia_smi(text: str) -> GpuInfo:
    """The first line of `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise GpuUnavailable("no GPU: nvidia-smi lists no device")
    name, _, cc = lines[0].rpartition(",")
    if not name or not cc.strip().replace(".", "").isdigit():
        raise GpuUnavailable(f"no GPU: cannot read nvidia-smi's answer {lines[0]!r}")
    return GpuInfo(name.strip(), cc.strip())


def gpu_info() -> GpuInfo:
    """GPU 0's name and compute capability, from the CUDA driver (pycuda), else from nvidia-smi."""
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            raise GpuUnavailable(f"no GPU (pycuda: {e}; no nvidia-smi)") from e
        done = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise GpuUnavailable(f"no GPU: nvidia-smi failed: {done.stderr.strip() or done.stdout.strip()}") from e
        return parse_nvidia_smi(done.stdout)
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            raise GpuUnavailable("no GPU: the CUDA driver sees no device")
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        return GpuInfo(dev.name(), f"{major}.{minor}")
    except cuda.Error as e:
        raise GpuUnavailable(f"no GPU (CUDA driver: {e})") from e


@contextlib.contextmanager
def cuda_primary_context(device: int = 0) -> Iterator[object]:
    """The device's primary context, current on this thread for the duration (pycuda)."""
    import pycuda.driver as cuda

    cuda.init()
    ctx = cuda.Device(device).retain_primary_context()
    ctx.push()
    try:
        yield ctx
    finally:
        cuda.Context.pop()


class _Engine:
    """One deserialized engine with its execution context and its page-locked/device output buffers."""

    def __init__(self, trt, runtime, plan: Path):
        import pycuda.driver as cuda

        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT cannot deserialize {plan} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"{plan}: expected one input and one output, found {inputs} -> {outputs}")
        self.input, self.output = inputs[0], outputs[0]
        lo, _opt, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input, 0))
        self.min_batch, self.max_batch, self.chw = lo[0], hi[0], tuple(hi[1:])
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input)))
        self.context.set_input_shape(self.input, hi)
        self.h_out = cuda.pagelocked_empty(tuple(self.context.get_tensor_shape(self.output)),
                                           np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output))))
        self.d_out = cuda.mem_alloc(self.h_out.nbytes)
        self.context.set_tensor_address(self.output, int(self.d_out))

    def enqueue(self, d_input, n: int, stream) -> None:
        import pycuda.driver as cuda

        self.context.set_input_shape(self.input, (n, *self.chw))
        self.context.set_tensor_address(self.input, int(d_input))
        if not self.context.execute_async_v3(stream.handle):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.output} at batch {n}")
        cuda.memcpy_dtoh_async(self.h_out[:n], self.d_out, stream)


class TensorRTRunner:
    """Runs a list of engines on one batch: one upload to a shared device input, one sync at the end."""

    def __init__(self, plans: Sequence[Path], graph_batches: Sequence[int] = (), device: int = 0):
        import pycuda.driver as cuda
        import tensorrt as trt

        from engines.trt_build import _trt_logger

        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()
        self._lock = threading.Lock()
        with self.active():
            self._logger = _trt_logger(trt)
            self._runtime = trt.Runtime(self._logger)
            self.engines = [_Engine(trt, self._runtime, Path(p)) for p in plans]
            first = self.engines[0]
            for e in self.engines[1:]:
                if (e.chw, e.input_dtype) != (first.chw, first.input_dtype):
                    raise EngineError(f"engines disagree on their input: {first.chw} {first.input_dtype} vs "
                                      f"{e.chw} {e.input_dtype}")
            self.max_batch = min(e.max_batch for e in self.engines)
            self.min_batch = max(e.min_batch for e in self.engines)
            self.h_in = cuda.pagelocked_empty((self.max_batch, *first.chw), first.input_dtype)
            self.d_in = cuda.mem_alloc(self.h_in.nbytes)
            self.stream = cuda.Stream()
        bad = [b for b in graph_batches if not self.min_batch <= b <= self.max_batch]
        if bad:
            raise ValueError(f"CUDA graph batch sizes {bad} are outside the engines' profile "
                             f"{self.min_batch}..{self.max_batch}")
        self.graph_batches = set(graph_batches)
        self._graphs: dict[int, object] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        import pycuda.driver as cuda

        self._ctx.push()
        try:
            yield
        finally:
            cuda.Context.pop()

    def _enqueue_all(self, n: int) -> None:
        import pycuda.driver as cuda

        cuda.memcpy_htod_async(self.d_in, self.h_in[:n], self.stream)
        for e in self.engines:
            e.enqueue(self.d_in, n, self.stream)

    def _graph(self, n: int):
        """A CUDA graph of upload + every engine + downloads at batch n (captured once, on first use)."""
        if n not in self._graphs:
            self._enqueue_all(n)  # TensorRT needs one enqueue after a shape change before a capture
            self.stream.synchronize()
            self.stream.begin_capture()
            self._enqueue_all(n)
            self._graphs[n] = self.stream.end_capture().instantiate()
            log.info("captured a CUDA graph for batch %d", n)
        return self._graphs[n]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every engine's float32 output for `batch` (split into chunks of at most max_batch)."""
        if len(batch) > self.max_batch:
            parts = [self.run(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
            return [np.concatenate(p) for p in zip(*parts, strict=True)]
        n = len(batch)
        if n < self.min_batch:
            raise ValueError(f"batch {n} is below the engines' minimum {self.min_batch}")
        with self._lock, self.active():
            self.h_in[:n] = batch
            if n in self.graph_batches:
                for e in self.engines:  # keep each context's shapes those the graph was captured with
                    e.context.set_input_shape(e.input, (n, *e.chw))
                self._graph(n).launch(self.stream)
            else:
                self._enqueue_all(n)
            self.stream.synchronize()
            return [e.h_out[:n].astype(np.float32) for e in self.engines]


class TensorRTBackend:
    """One engine behind the Backend protocol (bench and tests)."""

    name = "tensorrt"

    def __init__(self, plan: Path, graph_batches: Sequence[int] = ()):
        self.runner = TensorRTRunner([plan], graph_batches)
        self.input_name = self.runner.engines[0].input
        self.output_names = [self.runner.engines[0].output]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {self.output_names[0]: self.runner.run(batch)[0]}


class TensorRTPair:
    """EmbeddingPair on the dense and the sparse engine: one upload, both engines, one sync."""

    name = "tensorrt"

    def __init__(self, dense: Path, sparse: Path, graph_batches: Sequence[int] = ()):
        self.runner = TensorRTRunner([dense, sparse], graph_batches)

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dense, twin = self.runner.run(batch)
        return dense, twin


def tensorrt_pair(prepared: PreparedFR, opts: EngineOptions | None = None,
                  graph_batches: Sequence[int] = ()) -> TensorRTPair:
    """The TensorRT pair for `prepared`, building the engines if needed; BackendUnavailable says why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"no TensorRT (import tensorrt: {e})") from e
    try:
        import pycuda.driver  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"no pycuda ({e}); install the `gpu` extra") from e
    gpu_info()
    try:
        files = build_engines(prepared, opts)
    except EngineMismatch as e:
        raise BackendUnavailable(str(e), failed=True) from e
    except Exception as e:  # any build failure falls through to the next backend
        raise BackendUnavailable(f"engine build failed: {e}", failed=True) from e
    try:
        return TensorRTPair(files["dense"].plan, files["sparse"].plan, graph_batches)
    except Exception as e:
        raise BackendUnavailable(f"TensorRT runtime failed: {e}", failed=True) from e


def _gpu_memory_used_mb() -> float | None:
    """Device-wide GPU memory in use (pycuda's cuMemGetInfo, else nvidia-smi)."""
    try:
        import pycuda.driver as cuda

        with cuda_primary_context():
            free, total = cuda.mem_get_info()
        return round((total - free) / 2**20, 1)
    except ImportError:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        out = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return float(out[0]) if out else None


def _per_face_ms(fn, batch: np.ndarray, faces: int) -> float:
    for _ in range(3):
        fn(batch)
    reps = max(5, faces // len(batch))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(batch)
    return (time.perf_counter() - t0) * 1000.0 / (reps * len(batch))


def bench_score_gpu(prepared: PreparedFR, backend: str = "tensorrt", batches: Sequence[int] = (1, 8, 32, 128),
                    faces: int = 2048, opts: EngineOptions | None = None) -> dict:
    """`bestshot bench score --backend tensorrt|onnxruntime-cuda`: faces/s of dense, sparse (twin) and the pair
    at each batch size, the sparse/dense time ratio, and the GPU memory in use once the models are loaded."""
    from agent.factory import build_pair

    rng = np.random.default_rng(0)
    spec = prepared.spec
    if backend == "tensorrt":
        base = opts or EngineOptions()
        opts = EngineOptions(base.precision, Profile(1, base.profile.opt, max(base.profile.max, *batches)),
                             base.typing, base.workspace_mb, base.read_only)
        files = build_engines(prepared, opts)
        dense = TensorRTBackend(files["dense"].plan).run
        sparse = TensorRTBackend(files["sparse"].plan).run
        pair = TensorRTPair(files["dense"].plan, files["sparse"].plan).embed
    elif backend == "onnxruntime-cuda":
        from agent.backend import OnnxRuntimeCudaBackend
        from engines.fp16 import fp16_model_path

        dense = OnnxRuntimeCudaBackend(fp16_model_path(prepared.dense)).run
        sparse = OnnxRuntimeCudaBackend(fp16_model_path(prepared.twin)).run
        pair = build_pair(prepared, "trunk", backend="onnxruntime-cuda").embed
    else:
        raise ValueError(f"bench_score_gpu: backend {backend!r} is not a GPU backend")
    rows = []
    for b in batches:
        x = rng.normal(size=(b, 3, spec.input_size, spec.input_size)).astype(np.float32)
        ms = {k: _per_face_ms(fn, x, faces) for k, fn in (("dense", dense), ("sparse", sparse), ("pair", pair))}
        rows.append({"batch": b, **{f"{k}_faces_per_s": round(1000.0 / v, 1) for k, v in ms.items()},
                     "sparse_over_dense_time": round(ms["sparse"] / ms["dense"], 3)})
        log.info("batch %d: %s", b, rows[-1])
    return {"backend": backend, "gpu": gpu_info().name, "gpu_memory_used_mb": _gpu_memory_used_mb(), "rows": rows}
