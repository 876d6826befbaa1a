"""TensorRT runtime on pycuda: a chain of engines fed from one upload of the batch, on one stream.

The first engine reads the uploaded batch; a later engine reads, by tensor name, the uploaded batch or an
earlier engine's output buffer on the device (the split pair: the dense engine's branch-start activations feed
the sparse branch engine without a trip to the host). Outputs no later engine reads are downloaded into
page-locked host buffers; one synchronize per batch. Buffers are sized for the profile's largest batch.

CUDA graphs (`graph_batches`): one per fixed batch size, through cuda-python's cudart bindings
(agent/backends/cudagraph.py; pycuda has no capture API). Each graph gets its own execution contexts, so eager
batches of other sizes never change the shapes a graph was captured with; the chain runs once eagerly before
the capture, and a failed capture falls back to eager launches. pycuda and tensorrt are imported lazily: this
module loads on machines without either.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.backends.base import BackendUnavailable, Forward, PairBase
from agent.backends.cudagraph import GraphExec, capture
from engines import gpu
from engines.prepare import PreparedFR
from engines.recipe import STATS
from engines.trt_build import EngineError, EngineMismatch, EngineOptions, build_engines

log = logging.getLogger(__name__)


class _Engine:
    """One deserialized engine: its input and output names, per-sample shapes and dtypes, batch range."""

    def __init__(self, trt, runtime, plan: Path):
        self.plan = plan
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT cannot deserialize {plan} (built by another TensorRT version or GPU?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if not self.inputs or not self.outputs:
            raise EngineError(f"{plan}: needs inputs and outputs, found {self.inputs} -> {self.outputs}")
        self.dtype = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        hi: dict[str, tuple[int, ...]] = {}
        lo = 0
        for n in self.inputs:
            low, _opt, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
            lo, hi[n] = max(lo, low[0]), high
        self.min_batch, self.max_batch = lo, min(s[0] for s in hi.values())
        self.sample = {n: s[1:] for n, s in hi.items()}
        probe = self.context()
        for n, s in hi.items():
            probe.set_input_shape(n, s)
        self.sample.update({n: tuple(probe.get_tensor_shape(n))[1:] for n in self.outputs})

    def context(self):
        return self.engine.create_execution_context()


@dataclass
class _Buffer:
    device: object  # pycuda DeviceAllocation
    host: np.ndarray | None  # page-locked; None for a tensor that stays on the device


class TensorRTRunner:
    """Runs a chain of engines on one batch: one upload, device-to-device hand-over by tensor name, one sync."""

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
            self.max_batch = min(e.max_batch for e in self.engines)
            self.min_batch = max(e.min_batch for e in self.engines)
            self.fed = list(self.engines[0].inputs)
            self.buffers: dict[str, _Buffer] = {}
            self.results: list[list[str]] = []  # per engine: the outputs downloaded to the host
            sample = dict(self.engines[0].sample)
            dtype = dict(self.engines[0].dtype)
            for i, e in enumerate(self.engines):
                for n in e.inputs:
                    if n not in sample or (sample[n], dtype[n]) != (e.sample[n], e.dtype[n]):
                        raise EngineError(f"{e.plan}: input {n} {e.sample[n]} {e.dtype[n]} is neither the batch nor "
                                          f"an earlier engine's output of that shape and type")
                later = {n for f in self.engines[i + 1:] for n in f.inputs}
                self.results.append([n for n in e.outputs if n not in later])
                sample.update({n: e.sample[n] for n in e.outputs})
                dtype.update({n: e.dtype[n] for n in e.outputs})
            for n in [*self.fed, *(o for e in self.engines for o in e.outputs)]:
                host = cuda.pagelocked_empty((self.max_batch, *sample[n]), dtype[n])
                self.buffers[n] = _Buffer(cuda.mem_alloc(host.nbytes),
                                          host if n in self.fed or any(n in r for r in self.results) else None)
            self.contexts = [e.context() for e in self.engines]
            self.stream = cuda.Stream()
        self.sample = sample
        bad = [b for b in graph_batches if not self.min_batch <= b <= self.max_batch]
        if bad:
            raise ValueError(f"CUDA graph batch sizes {bad} are outside the engines' profile "
                             f"{self.min_batch}..{self.max_batch}")
        self.graph_batches = set(graph_batches)
        self._graphs: dict[int, tuple[list, GraphExec | None]] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        import pycuda.driver as cuda

        self._ctx.push()
        try:
            yield
        finally:
            cuda.Context.pop()

    def _enqueue(self, contexts: list, n: int) -> None:
        """Upload, every engine in order, downloads: all on the stream, nothing waits."""
        import pycuda.driver as cuda

        for name in self.fed:
            buf = self.buffers[name]
            cuda.memcpy_htod_async(buf.device, buf.host[:n], self.stream)
        for e, ctx, results in zip(self.engines, contexts, self.results, strict=True):
            for name in e.inputs:
                ctx.set_input_shape(name, (n, *e.sample[name]))
                ctx.set_tensor_address(name, int(self.buffers[name].device))
            for name in e.outputs:
                ctx.set_tensor_address(name, int(self.buffers[name].device))
            if not ctx.execute_async_v3(self.stream.handle):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for {e.plan.name} at batch {n}")
            for name in results:
                buf = self.buffers[name]
                cuda.memcpy_dtoh_async(buf.host[:n], buf.device, self.stream)

    def _launch(self, n: int) -> None:
        if n not in self.graph_batches:
            self._enqueue(self.contexts, n)
            return
        if n not in self._graphs:
            contexts = [e.context() for e in self.engines]  # the graph's own: its shapes never change
            self._enqueue(contexts, n)  # TensorRT needs one enqueue after a shape change before a capture
            self.stream.synchronize()
            graph = capture(self.stream.handle, lambda: self._enqueue(contexts, n), f"batch {n}")
            self._graphs[n] = (contexts if graph else [], graph)
            return  # this batch already ran eagerly
        graph = self._graphs[n][1]
        if graph is None:
            self._enqueue(self.contexts, n)
        else:
            graph.launch(self.stream.handle)

    def run(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per engine, its outputs that no later engine reads, float32, for `batch` (chunked at max_batch)."""
        if len(batch) > self.max_batch:
            parts = [self.run(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
            return [{k: np.concatenate([p[i][k] for p in parts]) for k in parts[0][i]} for i in range(len(parts[0]))]
        n = len(batch)
        if n < self.min_batch:
            raise ValueError(f"batch {n} is below the engines' minimum {self.min_batch}")
        if len(self.fed) != 1:
            raise EngineError(f"the first engine has {len(self.fed)} inputs; bestshot feeds one batch")
        with self._lock, self.active():
            self.buffers[self.fed[0]].host[:n] = batch
            self._launch(n)
            self.stream.synchronize()
            return [{k: self.buffers[k].host[:n].astype(np.float32) for k in r} for r in self.results]


class TensorRTBackend:
    """One engine behind the Backend protocol (bench and tests)."""

    name = "tensorrt"

    def __init__(self, plan: Path, graph_batches: Sequence[int] = ()):
        self.runner = TensorRTRunner([plan], graph_batches)
        self.input_name = self.runner.fed[0]
        self.output_names = list(self.runner.results[0])

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(batch)[0]


class TensorRTPair(PairBase):
    """EmbeddingPair on the split engines: the dense engine (embedding, activation statistics and the branch-start
    activations, kept on the device) feeds the 2:4-sparse branch engine; one upload, one sync."""

    name = "tensorrt"

    def __init__(self, dense: Path, branch: Path, graph_batches: Sequence[int] = ()):
        self.runner = TensorRTRunner([dense, branch], graph_batches)
        dense_out, branch_out = self.runner.results
        embedding = [n for n in dense_out if not n.startswith(STATS)]
        if len(embedding) != 1 or len(branch_out) != 1:
            raise EngineError(f"split engines: expected one dense embedding and one branch output, found "
                              f"{dense_out} and {branch_out}")
        self.embedding = embedding[0]

    def forward(self, batch: np.ndarray) -> Forward:
        dense, branch = self.runner.run(batch)
        (twin,) = branch.values()
        return Forward(dense[self.embedding], twin, {k: v for k, v in dense.items() if k != self.embedding})


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
        raise BackendUnavailable(f"no pycuda ({e}); install the `gpu-cu12` or `gpu-cu13` extra") from e
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
        return TensorRTPair(files["dense"].plan, files["branch"].plan, graph_batches)
    except Exception as e:
        raise BackendUnavailable(f"TensorRT runtime failed: {e}", failed=True) from e
