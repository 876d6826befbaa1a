"""Backend selection: `auto` falls back TensorRT -> ONNX Runtime CUDA -> ONNX Runtime CPU with one log line per
skipped backend; an explicit request that cannot be met is an error. Availability is monkeypatched here."""

from __future__ import annotations

import logging
import sys
import types

import onnxruntime as ort
import pytest

import agent.backends.tensorrt as trt_runtime
from agent.backends.base import BackendUnavailable, select_backend
from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.backends.pairs import SeparateTwins, SharedTrunk, build_pair
from agent.common.fr_spec import FACENET
from agent.pipeline.score import build_scorer
from engines import gpu
from engines.gpu import GpuInfo, GpuUnavailable
from engines.prepare import FACENET_RECIPE, prepare_fr
from engines.trt_build import EngineError


def skipped(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if "backend auto: skipping" in r.getMessage()]


def absent(reason: str):
    def make():
        raise BackendUnavailable(reason)

    return make


def test_auto_takes_the_first_backend_that_runs_and_logs_one_line_per_skip(caplog):
    def broken():
        raise BackendUnavailable("engine build failed: out of memory", failed=True)

    caplog.set_level(logging.INFO, "agent.backends.base")
    made = select_backend("auto", {"tensorrt": broken, "onnxruntime-cuda": absent("no CUDA"),
                                   "onnxruntime": lambda: "cpu"})
    assert made == ("onnxruntime", "cpu")
    assert skipped(caplog) == [
        (logging.WARNING, "backend auto: skipping tensorrt: engine build failed: out of memory"),
        (logging.INFO, "backend auto: skipping onnxruntime-cuda: no CUDA"),
    ]
    caplog.clear()
    assert select_backend("auto", {"tensorrt": lambda: "trt"}) == ("tensorrt", "trt")
    assert skipped(caplog) == []


def test_explicit_request_that_cannot_run_is_an_error():
    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' was requested but cannot run here: no TensorRT"):
        select_backend("tensorrt", {"tensorrt": absent("no TensorRT")})
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        select_backend("cuda", {})
    with pytest.raises(BackendUnavailable, match="no backend can run"):
        select_backend("auto", {k: absent("no") for k in ("tensorrt", "onnxruntime-cuda", "onnxruntime")})


def test_no_onnx_runtime_installed_names_the_extra(monkeypatch):
    """A bare `pip install bestshot-agent` (no `cpu` or `cuda` extra): the error says what to install."""
    import agent.backends.onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "installed_runtimes", lambda: [])
    ort_backend.check_runtime.cache_clear()
    try:
        makers = {"tensorrt": absent("no TensorRT"), "onnxruntime-cuda": ort_backend.require_cuda_provider,
                  "onnxruntime": lambda: OnnxRuntimeBackend("unused.onnx")}
        with pytest.raises(BackendUnavailable) as e:
            select_backend("auto", makers)
    finally:
        ort_backend.check_runtime.cache_clear()
    assert str(e.value) == ("backend auto: no backend can run here (tensorrt: no TensorRT; onnxruntime-cuda: no ONNX "
                            "Runtime installed: install bestshot with the extra `cpu` (or `cuda`); onnxruntime: no "
                            "ONNX Runtime installed: install bestshot with the extra `cpu` (or `cuda`))")


@pytest.fixture(scope="module")
def prepared():
    return prepare_fr(FACENET)


@pytest.fixture
def no_gpu_stack(monkeypatch):
    """No TensorRT installed, and an onnxruntime without the CUDA provider (this machine, made certain)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """`import tensorrt` and `import pycuda.driver` succeed (stand-in modules): the GPU checks come next."""
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = types.ModuleType("pycuda.driver")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", pycuda.driver)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def test_auto_without_tensorrt_or_cuda_runs_on_the_cpu(prepared, no_gpu_stack, caplog):
    caplog.set_level(logging.INFO)
    pair = build_pair(prepared, "trunk", backend="auto")
    assert isinstance(pair, SharedTrunk) and isinstance(pair.backend, OnnxRuntimeBackend)
    assert pair.backend.name == "onnxruntime"
    lines = skipped(caplog)
    assert [level for level, _ in lines] == [logging.INFO, logging.INFO]
    assert lines[0][1].startswith("backend auto: skipping tensorrt: no TensorRT (import tensorrt:")
    assert lines[1][1] == ("backend auto: skipping onnxruntime-cuda: onnxruntime has no CUDAExecutionProvider "
                           "(install onnxruntime-gpu: the `cuda` extra)")
    assert isinstance(build_pair(prepared, "separate", backend="auto"), SeparateTwins)


def test_tensorrt_installed_but_no_gpu(prepared, fake_tensorrt, monkeypatch, caplog):
    def no_gpu():
        raise GpuUnavailable("no GPU: the CUDA driver sees no device")

    monkeypatch.setattr(gpu, "gpu_info", no_gpu)
    caplog.set_level(logging.INFO)
    build_pair(prepared, backend="auto")
    reason = "no GPU: the CUDA driver sees no device"
    assert skipped(caplog)[0] == (logging.INFO, f"backend auto: skipping tensorrt: {reason}")
    with pytest.raises(BackendUnavailable, match="'tensorrt' was requested but cannot run here: no GPU"):
        build_pair(prepared, backend="tensorrt")


def test_engine_build_failure_falls_through_with_the_error(prepared, fake_tensorrt, monkeypatch, caplog):
    def build_fails(prepared, opts=None):
        raise EngineError("TensorRT cannot parse twin.onnx: unsupported operator")

    monkeypatch.setattr(gpu, "gpu_info", lambda: GpuInfo("NVIDIA H100 80GB HBM3", "9.0"))
    monkeypatch.setattr(trt_runtime, "build_engines", build_fails)
    caplog.set_level(logging.INFO)
    assert isinstance(build_pair(prepared, backend="auto"), SharedTrunk)
    assert skipped(caplog)[0] == (logging.WARNING, "backend auto: skipping tensorrt: engine build failed: TensorRT "
                                                   "cannot parse twin.onnx: unsupported operator")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_provider_without_a_device_falls_through(prepared, monkeypatch, caplog):
    """onnxruntime-gpu installed on a machine without a usable GPU: the session silently lands on the CPU."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    caplog.set_level(logging.INFO)
    pair = build_pair(prepared, backend="auto")
    assert pair.backend.name == "onnxruntime"
    assert "CUDAExecutionProvider did not start" in skipped(caplog)[1][1]
    with pytest.raises(BackendUnavailable, match="'onnxruntime-cuda' was requested but cannot run here"):
        build_pair(prepared, backend="onnxruntime-cuda")


def test_build_scorer_keeps_its_positional_signature(no_gpu_stack):
    scorer, prepared = build_scorer(FACENET, FACENET_RECIPE, "trunk", None, 16, None)
    assert scorer.max_batch == 16 and scorer.pair.backend.name == "onnxruntime"
    scorer, _ = build_scorer(FACENET, FACENET_RECIPE, backend="onnxruntime")
    assert isinstance(scorer.pair, SharedTrunk)
    with pytest.raises(ValueError, match="unknown scoring form"):
        build_pair(prepared, "both")
