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
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from agent.backends.base import BackendUnavailable, Forward, PairBase
from engines import gpu
from engines.prepare import PreparedFR
from engines.trt_build import EngineError, EngineMismatch, EngineOptions, build_engines

log = logging.getLogger(__name__)


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


class TensorRTPair(PairBase):
    """EmbeddingPair on the dense and the sparse engine: one upload, both engines, one sync (no activation
    statistics: the selection score falls back to its form without them)."""

    name = "tensorrt"

    def __init__(self, dense: Path, sparse: Path, graph_batches: Sequence[int] = ()):
        self.runner = TensorRTRunner([dense, sparse], graph_batches)

    def forward(self, batch: np.ndarray) -> Forward:
        dense, twin = self.runner.run(batch)
        return Forward(dense, twin)


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
    try:
        gpu.gpu_info()
    except gpu.GpuUnavailable as e:
        raise BackendUnavailable(str(e)) from e
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
