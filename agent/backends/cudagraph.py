"""CUDA graphs through cuda-python's runtime bindings (`cuda.bindings.runtime`, the `gpu-cu12`/`gpu-cu13` extras).

pycuda's `Stream` has no capture API, so capture, instantiation and launch go through cudart on the pycuda
stream's raw handle (`stream.handle`; both use the device's primary context). A capture that fails for any
reason ends the capture in `finally` (a stream left capturing would fail every later launch) and returns
None: the caller keeps launching eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class CudaGraphError(RuntimeError):
    """A cudart call returned an error; the message names the call and the error."""


def _check(call: str, result: tuple) -> tuple:
    from cuda.bindings import runtime as rt

    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        _, text = rt.cudaGetErrorString(err)
        raise CudaGraphError(f"{call}: {err.name} ({text.decode() if isinstance(text, bytes) else text})")
    return tuple(values)


class GraphExec:
    """An instantiated CUDA graph; `launch` enqueues it on a stream."""

    def __init__(self, exe: object):
        self.exe = exe

    def launch(self, stream: int) -> None:
        from cuda.bindings import runtime as rt

        _check("cudaGraphLaunch", rt.cudaGraphLaunch(self.exe, stream))

    def close(self) -> None:
        from cuda.bindings import runtime as rt

        if self.exe is not None:
            rt.cudaGraphExecDestroy(self.exe)
            self.exe = None


def capture(stream: int, enqueue: Callable[[], None], what: str) -> GraphExec | None:
    """Capture the work `enqueue` puts on `stream` (a raw CUDA stream handle) into an executable graph.

    The caller must have run `enqueue` once eagerly at these shapes (TensorRT needs one enqueue after a shape
    change before a capture). Returns None, with one WARNING naming the cause, when the capture cannot be made."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError as e:
        log.warning("no CUDA graph for %s: cuda-python is not installed (%s); launching eagerly", what, e)
        return None
    graph = None
    try:
        _check("cudaStreamBeginCapture",
               rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            enqueue()
        finally:
            (graph,) = _check("cudaStreamEndCapture", rt.cudaStreamEndCapture(stream))
        (exe,) = _check("cudaGraphInstantiate", rt.cudaGraphInstantiate(graph, 0))
    except Exception as e:  # any failure: eager launches stay correct, only slower
        log.warning("no CUDA graph for %s: capture failed (%s); launching eagerly", what, e)
        return None
    finally:
        if graph is not None:
            rt.cudaGraphDestroy(graph)
    log.info("captured a CUDA graph for %s", what)
    return GraphExec(exe)
