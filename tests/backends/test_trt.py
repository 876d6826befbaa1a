"""TensorRT engines: profile and cache-key logic, locking, sparsity proof parsing, FP16 export (all on the CPU),
and the GPU checks (marked `gpu`, skipped where no GPU is present)."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import shutil
import sys
import threading
import time
import types
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from scipy.stats import spearmanr

from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.common.fr_spec import FACENET, preprocess
from agent.pipeline.align import align
from agent.pipeline.detect import DetectorSpec, make_detector
from agent.pipeline.score import l2n, prefiqs
from engines.fp16 import fp16_model_path, to_fp16
from engines.gpu import GpuInfo, GpuUnavailable, parse_nvidia_smi
from engines.prepare import FACENET_RECIPE, PreparedFR, prepare_fr
from engines.prune import is_24, prunable_layers
from engines.recipe import Recipe
from engines.trt_build import (
    EngineError,
    EngineMismatch,
    EngineOptions,
    Profile,
    engine_fields,
    engine_lines,
    engine_report,
    ensure_engine,
    mismatches,
    parse_inspector,
    parse_sparsity_log,
    plan_path,
    resolve_typing,
    timing_cache_path,
)

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", 132, 81559)
ENV = ("10.3.0", H100)


def _quiet(line: str) -> None:
    """A progress callback that drops the lines."""


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (l2n(a) * l2n(b)).sum(1)


@pytest.fixture
def fake_prepared(tmp_path: Path) -> PreparedFR:
    rdir = tmp_path / "fr" / "facenet-0123456789ab" / "2_4_0.75-1"
    rdir.mkdir(parents=True)
    man = {"dense_sha256": "d" * 64, "twin_sha256": "t" * 64, "pair_sha256": "p" * 64, "recipe": FACENET_RECIPE}
    return PreparedFR(FACENET, Recipe.parse(FACENET_RECIPE), rdir.parent / "dense.onnx", rdir / "twin.onnx",
                      rdir / "pair.onnx", man, rdir)


# --- profile, options, typing -----------------------------------------------------------------------------


def test_profile_validation_and_shapes():
    assert Profile().shapes((3, 160, 160)) == ((1, 3, 160, 160), (32, 3, 160, 160), (128, 3, 160, 160))
    assert Profile(4, 4, 4).max == 4
    for bad in ((0, 1, 1), (2, 1, 8), (1, 16, 8), (1, 8, 5000), (1, 8.0, 16)):
        with pytest.raises(ValueError, match="batch profile"):
            Profile(*bad)


def test_engine_options_validation():
    with pytest.raises(ValueError, match="precision 'fp8'"):
        EngineOptions(precision="fp8")
    with pytest.raises(ValueError, match="precision 'int8'"):  # no caller had calibration crops: removed
        EngineOptions(precision="int8")
    with pytest.raises(ValueError, match="typing"):
        EngineOptions(typing="loose")


def test_typing_is_strong_unless_asked_on_tensorrt_10():
    assert resolve_typing(EngineOptions(), "10.3.0") == "strong"  # JetPack 6: the FP32 L2 tail stays FP32
    assert resolve_typing(EngineOptions(), "11.3.0") == "strong"
    assert resolve_typing(EngineOptions(typing="weak"), "10.3.0") == "weak"
    with pytest.raises(EngineError, match="no weakly typed networks"):
        resolve_typing(EngineOptions(typing="weak"), "11.0.1")


# --- cache key and manifest -------------------------------------------------------------------------------------


def test_engine_fields_key_everything_that_invalidates_a_plan(fake_prepared):
    dense = engine_fields(fake_prepared, "dense", EngineOptions(), *ENV)
    branch = engine_fields(fake_prepared, "branch", EngineOptions(), *ENV)
    assert dense["recipe"] == branch["recipe"] == FACENET_RECIPE  # the recipe sets the split point: both depend on it
    assert dense["pair_sha256"] == "p" * 64 and dense["split"] == 1
    assert dense["profile"] == [1, 32, 128] and dense["typing"] == "strong" and dense["fp16_export"] == 1
    assert (dense["sm_count"], dense["memory_mb"]) == (132, 81559)
    assert mismatches(None, dense) == ["no engine built yet"]
    assert mismatches(dense, dense) == []
    orin = GpuInfo("Orin (nvgpu)", "8.7", 16, 62841)  # AGX Orin 64 GB; the NX 16 GB has the same name
    changed = {
        "tensorrt": engine_fields(fake_prepared, "dense", EngineOptions(), "10.4.0", H100),
        "gpu": engine_fields(fake_prepared, "dense", EngineOptions(), ENV[0], replace(H100, name="Orin (nvgpu)")),
        "compute_capability": engine_fields(fake_prepared, "dense", EngineOptions(), ENV[0],
                                            replace(H100, compute_capability="8.7")),
        "sm_count": engine_fields(fake_prepared, "dense", EngineOptions(), ENV[0], replace(H100, sm_count=114)),
        "memory_mb": engine_fields(fake_prepared, "dense", EngineOptions(), ENV[0], replace(H100, memory_mb=143771)),
        "profile": engine_fields(fake_prepared, "dense", EngineOptions(profile=Profile(1, 8, 64)), *ENV),
        "typing": engine_fields(fake_prepared, "dense", EngineOptions(typing="weak"), *ENV),
    }
    for key, fields in changed.items():
        diff = [d for d in mismatches(dense, fields) if not d.startswith("fp16_export")]
        assert len(diff) == 1 and diff[0].startswith(f"{key}: built for "), diff
    nx = replace(orin, sm_count=8, memory_mb=15656)
    assert {d.split(":")[0] for d in mismatches(engine_fields(fake_prepared, "dense", EngineOptions(), "10.3.0", orin),
                                                engine_fields(fake_prepared, "dense", EngineOptions(), "10.3.0", nx))
            } == {"sm_count", "memory_mb"}
    fake_prepared.manifest["pair_sha256"] = "u" * 64  # another recipe or model: another pair, another split
    other = engine_fields(fake_prepared, "branch", EngineOptions(), *ENV)
    assert mismatches(branch, other)[0].startswith("pair_sha256")
    assert plan_path(fake_prepared, "dense", "fp16") == fake_prepared.dir / "engines" / "dense-fp16.plan"
    assert plan_path(fake_prepared, "branch", "fp16") == fake_prepared.dir / "engines" / "branch-fp16.plan"
    assert timing_cache_path("10.3.0", orin, Path("/c")) == Path("/c/trt/timing-10.3.0-sm87-16sm-62841mb.cache")
    assert timing_cache_path("10.3.0", nx, Path("/c")) != timing_cache_path("10.3.0", orin, Path("/c"))


class Builds:
    """A stand-in for the TensorRT build: counts calls, optionally slow."""

    def __init__(self, delay: float = 0.0):
        self.calls, self.delay = 0, delay

    def __call__(self) -> tuple[bytes, dict]:
        self.calls += 1
        time.sleep(self.delay)
        return f"plan {self.calls}".encode(), {"seconds": self.delay}


def test_ensure_engine_builds_reuses_rebuilds_and_refuses_read_only(fake_prepared):
    plan = plan_path(fake_prepared, "branch", "fp16")
    fields = engine_fields(fake_prepared, "branch", EngineOptions(), *ENV)
    build, lines = Builds(), []
    first = ensure_engine(plan, fields, False, build, lines.append)
    assert build.calls == 1 and plan.read_bytes() == b"plan 1" and first.manifest["tensorrt"] == "10.3.0"
    assert json.loads(plan.with_suffix(".json").read_text())["plan_sha256"] == first.manifest["plan_sha256"]
    assert ensure_engine(plan, fields, False, build, lines.append).manifest == first.manifest
    assert build.calls == 1 and "reusing" in lines[-1]
    # read-only with a fitting engine: fine
    assert ensure_engine(plan, fields, True, build, lines.append).plan == plan
    # another TensorRT: read-only refuses and says what differs; otherwise it rebuilds
    newer = engine_fields(fake_prepared, "branch", EngineOptions(), "10.4.0", H100)
    with pytest.raises(EngineMismatch, match=r"read-only: tensorrt: built for '10.3.0', this run needs '10.4.0'"):
        ensure_engine(plan, newer, True, build, lines.append)
    assert build.calls == 1
    assert ensure_engine(plan, newer, False, build, lines.append).manifest["tensorrt"] == "10.4.0"
    assert build.calls == 2 and plan.read_bytes() == b"plan 2"
    # a plan that does not match its manifest (truncated copy, edited file) is rebuilt
    plan.write_bytes(b"garbage")
    ensure_engine(plan, newer, False, build, lines.append)
    assert build.calls == 3 and plan.read_bytes() == b"plan 3"
    missing = plan_path(fake_prepared, "dense", "fp16")
    with pytest.raises(EngineMismatch, match="no engine built yet"):
        ensure_engine(missing, engine_fields(fake_prepared, "dense", EngineOptions(), *ENV), True, build, _quiet)


def test_two_threads_building_the_same_engine_build_it_once(fake_prepared):
    plan = plan_path(fake_prepared, "dense", "fp16")
    fields = engine_fields(fake_prepared, "dense", EngineOptions(), *ENV)
    build, results = Builds(delay=0.5), []
    threads = [threading.Thread(target=lambda: results.append(ensure_engine(plan, fields, False, build, _quiet)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert build.calls == 1
    assert results[0].manifest == results[1].manifest and plan.read_bytes() == b"plan 1"


def _build_in_process(plan: str, fields: dict, counter: str) -> None:
    def build() -> tuple[bytes, dict]:
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        return b"plan from a process", {}

    ensure_engine(Path(plan), fields, False, build, _quiet)


def test_two_processes_building_the_same_engine_build_it_once(fake_prepared, tmp_path):
    plan = plan_path(fake_prepared, "dense", "fp16")
    fields = engine_fields(fake_prepared, "dense", EngineOptions(), *ENV)
    counter = tmp_path / "builds.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_in_process, args=(str(plan), fields, str(counter))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert counter.read_text().splitlines() == ["built"]
    assert plan.read_bytes() == b"plan from a process"


# --- proof of sparsity ---------------------------------------------------------------------------------------------

# Builder log lines in the form TensorRT prints them (NVIDIA/TensorRT issues #1403, #2169, #4056): through
# trtexec's logger with its prefix, and through a Python ILogger (the message only).
BUILD_LOG = """\
[11/25/2026-10:02:11] [I] [TRT] Local timing cache in use. Profiling results in this builder pass will not be stored.
[11/25/2026-10:02:40] [I] [TRT] (Sparsity) Layers eligible for sparse math: InceptionResnetV1/Block8/Conv2d_1x1/Conv2D \
+ InceptionResnetV1/Block8/Relu, InceptionResnetV1/Repeat_2/block8_5/Branch_1/Conv2d_0c_3x1/Conv2D, \
InceptionResnetV1/Bottleneck/MatMul
[11/25/2026-10:02:40] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: \
InceptionResnetV1/Repeat_2/block8_5/Branch_1/Conv2d_0c_3x1/Conv2D
[11/25/2026-10:02:41] [I] [TRT] Total Activation Memory: 104857600 bytes
"""


def test_parse_the_builders_sparsity_lines():
    rep = parse_sparsity_log(BUILD_LOG.splitlines())
    assert rep.source == "builder log"
    assert rep.eligible == ["InceptionResnetV1/Block8/Conv2d_1x1/Conv2D + InceptionResnetV1/Block8/Relu",
                            "InceptionResnetV1/Repeat_2/block8_5/Branch_1/Conv2d_0c_3x1/Conv2D",
                            "InceptionResnetV1/Bottleneck/MatMul"]
    assert rep.sparse == ["InceptionResnetV1/Repeat_2/block8_5/Branch_1/Conv2d_0c_3x1/Conv2D"]
    python_logger = ["(Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51",
                     "(Sparsity) TRT inference plan picks sparse implementation for layers:"]
    rep = parse_sparsity_log(python_logger)
    assert rep.summary()["layers_eligible"] == 2 and rep.summary()["layers_sparse"] == 0
    assert parse_sparsity_log(["[I] [TRT] Total Host Persistent Memory: 160"]) is None


def _conv(name: str, sparse_weights: int, tactic: str) -> dict:
    """One convolution as the engine inspector prints it with ProfilingVerbosity.DETAILED (TensorRT 10.x form,
    per NVIDIA's Engine Inspector documentation and the dump quoted in NVIDIA/TensorRT issue #4020)."""
    return {
        "Name": name, "LayerType": "CaskConvolution",
        "Inputs": [{"Name": f"{name}_in", "Location": "Device", "Dimensions": [32, 1792, 3, 3],
                    "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
        "Outputs": [{"Name": f"{name}_out", "Location": "Device", "Dimensions": [32, 192, 3, 3],
                     "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
        "ParameterType": "Convolution", "Kernel": [1, 1], "PaddingMode": "kEXPLICIT_ROUND_DOWN",
        "PrePadding": [0, 0], "PostPadding": [0, 0], "Stride": [1, 1], "Dilation": [1, 1], "OutMaps": 192,
        "Groups": 1, "Weights": {"Type": "Half", "Count": 344064}, "Bias": {"Type": "Half", "Count": 192},
        "HasBias": 1, "HasReLU": 1, "HasSparseWeights": sparse_weights, "HasDynamicFilter": 0,
        "HasDynamicBias": 0, "HasResidual": 0, "Activation": "RELU", "TacticName": tactic,
        "TacticValue": "0x9251329244d2a80b", "StreamId": 0, "Metadata": f"[ONNX Layer: {name}]",
    }


INSPECTOR_10 = {
    "Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0", "LayerType": "Reformat", "TacticValue": "0x0"},
        _conv("block8/Conv2d_1x1", 1, "sm90_xmma_fprop_sparse_conv_f16f16_f32_f16_nhwckrsc_nhwc_tilesize128x128x64"),
        _conv("block8/Branch_1/Conv2d_0b_1x3", 1, "sm90_xmma_fprop_implicit_gemm_f16f16_f32_f16_nhwckrsc_nhwc"),
        _conv("Conv2d_1a_3x3", 0, "sm90_xmma_fprop_implicit_gemm_f16f16_f32_f16_nhwckrsc_nhwc"),
    ],
    "Bindings": ["input", "embedding"],
}


def test_parse_the_engine_inspector_json():
    rep = parse_inspector(json.dumps(INSPECTOR_10))
    assert rep.eligible == ["block8/Conv2d_1x1", "block8/Branch_1/Conv2d_0b_1x3"]
    assert rep.sparse == ["block8/Conv2d_1x1"]
    # TensorRT 11: "I/O Tensors" replaces "Bindings", "Format/Datatype" splits in two; the layer fields we read stay.
    layers = [{k: v for k, v in layer.items() if k not in ("Inputs", "Outputs")} for layer in INSPECTOR_10["Layers"]]
    v11 = {"Layers": layers, "I/O Tensors": [{"Name": "input", "IOMode": "Input", "DataType": "Float",
                                              "Dimensions": [-1, 3, 160, 160], "Location": "Device"}]}
    assert parse_inspector(v11).summary() == rep.summary() | {"source": "engine inspector"}
    with pytest.raises(ValueError, match="DETAILED"):
        parse_inspector({"Layers": ["conv1 + relu1", "conv2"], "Bindings": ["input", "embedding"]})


def test_parse_nvidia_smi():
    assert parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0\n") == GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
    assert parse_nvidia_smi("NVIDIA H200, 9.0, 143771\n") == GpuInfo("NVIDIA H200", "9.0", None, 143771)
    assert parse_nvidia_smi("NVIDIA RTX A6000, 8.6\nNVIDIA RTX A6000, 8.6\n").compute_capability == "8.6"
    for bad in ("", "No devices were found"):
        with pytest.raises(GpuUnavailable):
            parse_nvidia_smi(bad)


def test_engine_report_without_tensorrt(fake_prepared, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    report = engine_report(fake_prepared)
    assert [e["built"] for e in report["engines"]] == [False, False]
    assert report["environment"].startswith("not checked here: no TensorRT")
    plan = plan_path(fake_prepared, "branch", "fp16")
    fields = engine_fields(fake_prepared, "branch", EngineOptions(), *ENV)
    sparsity = {"inspector": {"source": "engine inspector", "layers_eligible": 10, "layers_sparse": 3,
                              "eligible": [], "sparse": []}, "log": None}
    ensure_engine(plan, fields, False, lambda: (b"plan", {"sparsity": sparsity, "seconds": 200.0}), _quiet)
    sparse = engine_report(fake_prepared)["engines"][1]
    assert sparse["built"] and (sparse["layers_sparse"], sparse["layers_eligible"]) == (3, 10)
    lines = engine_lines(engine_report(fake_prepared))
    assert "3/10 layers sparse/eligible" in lines[2] and "not built" in lines[1]


# --- FP16 export ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared() -> PreparedFR:
    return prepare_fr(FACENET)


@pytest.fixture(scope="module")
def lfw_batch(shared_dir) -> np.ndarray:
    """40 real LFW faces, detected, aligned and preprocessed for FaceNet."""
    detector = make_detector(DetectorSpec())
    people = sorted(p for p in (shared_dir / "data/lfw/images").iterdir())[:40]
    crops = []
    for p in people:
        img = cv2.imread(str(sorted(p.iterdir())[0]))
        dets = detector.detect(img)
        assert dets, p.name
        d = min(dets, key=lambda d: np.linalg.norm((d.bbox[:2] + d.bbox[2:]) / 2 - 125))
        crops.append(align(img, d, FACENET))
    return preprocess(crops, FACENET)


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> list[np.ndarray]:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"input": x})


def test_fp16_export_keeps_float32_io_and_the_embeddings(prepared, lfw_batch):
    rand = np.random.default_rng(0).normal(size=(8, 3, 160, 160)).astype(np.float32)
    for path in (prepared.dense, prepared.twin, prepared.pair):
        fp32 = onnx.load(str(path))
        fp16 = to_fp16(fp32)
        assert [(o.name, o.type.tensor_type.elem_type) for o in fp16.graph.output] == \
               [(o.name, TensorProto.FLOAT) for o in fp32.graph.output]
        assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
        halves = sum(t.data_type == TensorProto.FLOAT16 for t in fp16.graph.initializer)
        assert halves >= 0.95 * len(fp16.graph.initializer)
        onnx.shape_inference.infer_shapes(fp16, strict_mode=True)
        for x in (rand, lfw_batch):
            for a, b in zip(_run(fp32, x), _run(fp16, x), strict=True):
                assert cos(a, b).min() >= 0.999, path


def test_fp16_export_keeps_the_2_4_pattern_and_is_cached(prepared):
    twin32 = onnx.load(str(prepared.twin))
    axes = {p.weight: p.axis for p in prunable_layers(twin32)}
    path = fp16_model_path(prepared.twin)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name in prepared.manifest["sparsity"]:
        w = inits[name + "_fp16"]
        assert w.dtype == np.float16 and is_24(w, axes[name]), name
    mtime = path.stat().st_mtime_ns
    assert fp16_model_path(prepared.twin) == path and path.stat().st_mtime_ns == mtime


# --- on a GPU (skipped here: no device) ----------------------------------------------------------------------------


def _no_gpu() -> str | None:
    return None if shutil.which("nvidia-smi") else "no NVIDIA GPU (nvidia-smi not found)"


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu() is not None, reason=str(_no_gpu()))
def test_tensorrt_engines_match_onnxruntime_on_lfw(prepared, lfw_batch):
    for module in ("tensorrt", "pycuda"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    from agent.backends.tensorrt import tensorrt_pair

    pair = tensorrt_pair(prepared, EngineOptions(profile=Profile(1, 16, 64)))
    dense, twin = pair.embed(lfw_batch)
    ref_dense = OnnxRuntimeBackend(prepared.dense).run(lfw_batch)["embedding"]
    ref_twin = OnnxRuntimeBackend(prepared.twin).run(lfw_batch)["embedding"]
    assert cos(dense, ref_dense).min() >= 0.999
    assert cos(twin, ref_twin).min() >= 0.995
    rho = spearmanr(prefiqs(dense, twin)[0], prefiqs(ref_dense, ref_twin)[0]).statistic
    assert rho >= 0.98


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu() is not None, reason=str(_no_gpu()))
def test_onnxruntime_cuda_matches_the_cpu(prepared, lfw_batch):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from agent.backends.pairs import build_pair

    gd, gt = build_pair(prepared, "trunk", backend="onnxruntime-cuda").embed(lfw_batch)
    cd, ct = build_pair(prepared, "trunk", backend="onnxruntime").embed(lfw_batch)
    assert cos(gd, cd).min() >= 0.999 and cos(gt, ct).min() >= 0.999
    assert spearmanr(prefiqs(gd, gt)[0], prefiqs(cd, ct)[0]).statistic >= 0.98


# --- the build and runtime control flow, on stand-ins for tensorrt and pycuda ------------------------------------
# These stand-ins implement only what bestshot calls, with the names and call shapes of NVIDIA's TensorRT 10/11
# Python API and of pycuda; they check bestshot's own logic (flags, profile, timing cache, manifest, one upload
# for both engines), not TensorRT itself: that needs the GPU tests above.


class FakeCuda:
    """pycuda.driver: device memory is a dict of byte arrays; copies are counted."""

    Error = RuntimeError

    def __init__(self):
        self.mem: dict[int, np.ndarray] = {}
        self.copies = {"htod": 0, "dtoh": 0}
        outer = self

        class Ptr(int):
            pass

        class Stream:
            handle = 7

            def synchronize(self):
                pass

        class Ctx:
            def push(self):
                pass

        class Context:
            @staticmethod
            def pop():
                pass

        class Device:
            def __init__(self, i):
                pass

            @staticmethod
            def count():
                return 1

            def retain_primary_context(self):
                return Ctx()

        def mem_alloc(nbytes):
            ptr = Ptr(len(outer.mem) + 1)
            outer.mem[ptr] = np.zeros(nbytes, np.uint8)
            return ptr

        def htod(dst, src, stream=None):
            outer.copies["htod"] += 1
            outer.mem[int(dst)][: src.nbytes] = np.ascontiguousarray(src).view(np.uint8).ravel()

        def dtoh(dst, src, stream=None):
            outer.copies["dtoh"] += 1
            dst.reshape(-1).view(np.uint8)[:] = outer.mem[int(src)][: dst.nbytes]

        self.module = types.ModuleType("pycuda.driver")
        self.module.__dict__.update(Error=RuntimeError, Stream=Stream, Context=Context, Device=Device,
                                    init=lambda: None, mem_alloc=mem_alloc, memcpy_htod_async=htod,
                                    memcpy_dtoh_async=dtoh, pagelocked_empty=np.zeros)


def fake_tensorrt(version: str, cuda: FakeCuda, record: dict) -> types.ModuleType:
    """tensorrt: a builder that logs the (Sparsity) lines and drives the progress monitor as TensorRT does, and the
    split engines: dense `input` (n, 3, 4, 4) -> `embedding` (n, 5), each sample's sum repeated, and the branch start
    `start` (n, 2) = (sum, sum); branch `start` -> `embedding_twin` (n, 5) = 2 x start[:, 0] repeated."""
    trt = types.ModuleType("tensorrt")
    enum = types.SimpleNamespace
    trt.__version__ = version
    trt.MemoryPoolType = enum(WORKSPACE="workspace")
    trt.ProfilingVerbosity = enum(DETAILED="detailed")
    trt.BuilderFlag = enum(FP16="FP16", INT8="INT8", SPARSE_WEIGHTS="SPARSE_WEIGHTS")
    trt.NetworkDefinitionCreationFlag = enum(STRONGLY_TYPED=5)
    trt.LayerInformationFormat = enum(JSON="json")
    trt.TensorIOMode = enum(INPUT="in", OUTPUT="out")
    trt.nptype = lambda t: np.float32
    trt.ILogger = type("ILogger", (), {"__init__": lambda self: None})
    trt.IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda self: None})

    class Network:
        num_inputs = 1
        branch = False

        def get_input(self, i):
            if self.branch:
                return types.SimpleNamespace(name="start", shape=(-1, 2))
            return types.SimpleNamespace(name="input", shape=(-1, 3, 4, 4))

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            record["parsed"].append(Path(path).name)
            self.network.branch = "branch" in Path(path).name
            return True

    class OptProfile:
        def set_shape(self, name, *shapes):
            self.shapes = (name, *shapes)

    class Cache:
        """Timing entries; combining two caches adds the entries the first lacks, as ITimingCache.combine does."""

        def __init__(self, data: bytes):
            self.entries = set(data.split(b"+")) - {b""}

        def combine(self, other, ignore_mismatch):
            self.entries |= other.entries
            return True

        def serialize(self):
            return b"+".join(sorted(self.entries))

    class Config:
        def __init__(self):
            self.flags, self.cache, self.progress_monitor = set(), None, None

        def set_memory_pool_limit(self, pool, size):
            record["workspace"] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            record["profiles"].append(profile.shapes)

        def create_timing_cache(self, data):
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            if b"refused" in cache.entries:  # a cache TensorRT rejects: set_timing_cache returns False
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            record["network_flags"].append(flags)
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptProfile()

        def build_serialized_network(self, network, config):
            record["flags"].append(sorted(config.flags))
            config.progress_monitor.phase_start("Building engine", None, 20)
            for step in range(20):
                config.progress_monitor.step_complete("Building engine", step)
            config.progress_monitor.phase_finish("Building engine")
            sparse = "SPARSE_WEIGHTS" in config.flags
            if sparse:
                self.logger.log(3, "(Sparsity) Layers eligible for sparse math: block8/Conv2d_1x1, b/Conv2d_0b_1x3")
                self.logger.log(3, "(Sparsity) TRT inference plan picked sparse implementation for layers: "
                                   "block8/Conv2d_1x1")
            plan = b"branch" if sparse else b"dense"
            config.cache.entries.add(plan)
            return plan

    shapes = {"input": (3, 4, 4), "start": (2,), "embedding": (5,), "embedding_twin": (5,)}

    def read(ptr: int, n: int, name: str) -> np.ndarray:
        size = n * int(np.prod(shapes[name]))
        return cuda.mem[ptr].view(np.float32)[:size].reshape(n, -1)

    def write(ptr: int, y: np.ndarray) -> None:
        cuda.mem[ptr][: y.nbytes] = y.astype(np.float32).view(np.uint8).ravel()

    class Context:
        def __init__(self, io):
            self.io, self.batch, self.addr = io, None, {}
            record["contexts"] += 1

        def set_input_shape(self, name, shape):
            assert name == self.io[0] and tuple(shape[1:]) == shapes[name]
            self.batch = shape[0]

        def get_tensor_shape(self, name):
            return (self.batch, *shapes[name])

        def set_tensor_address(self, name, ptr):
            self.addr[name] = int(ptr)

        def execute_async_v3(self, stream_handle):
            n = self.batch
            x = read(self.addr[self.io[0]], n, self.io[0])
            if self.io[0] == "input":
                total = x.sum(1, keepdims=True)
                write(self.addr["embedding"], np.repeat(total, 5, axis=1))
                write(self.addr["start"], np.repeat(total, 2, axis=1))
            else:
                write(self.addr["embedding_twin"], np.repeat(2 * x[:, :1], 5, axis=1))
            record["executed"].append((self.io[0], n))
            return True

    class Engine:
        num_layers = 4

        def __init__(self, plan):
            self.io = ("start", "embedding_twin") if plan == b"branch" else ("input", "embedding", "start")
            self.num_io_tensors = len(self.io)

        def create_engine_inspector(self):
            return types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps(INSPECTOR_10))

        def get_tensor_name(self, i):
            return self.io[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == self.io[0] else trt.TensorIOMode.OUTPUT

        def get_tensor_profile_shape(self, name, profile):
            return [(b, *shapes[name]) for b in (1, 4, 8)]

        def get_tensor_dtype(self, name):
            return "float"

        def create_execution_context(self):
            return Context(self.io)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine(bytes(plan))

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


@pytest.fixture
def fakes(monkeypatch, fake_prepared):
    from engines import gpu, trt_build
    from engines.split import Split

    cuda = FakeCuda()
    record = {"parsed": [], "flags": [], "profiles": [], "network_flags": [], "contexts": 0, "executed": []}
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda.module
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda.module)
    monkeypatch.setattr(gpu, "gpu_info", lambda: H100)
    rdir = fake_prepared.dir
    monkeypatch.setattr(trt_build, "split_pair", lambda pair: Split(
        rdir / "split-dense.onnx", rdir / "split-branch.onnx", ["start"], "embedding_twin", ["twin/MatMul"]))

    def use(version: str) -> dict:
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, cuda, record))
        return record

    return cuda, use


def test_build_engines_control_flow(fake_prepared, fakes, tmp_path, monkeypatch, caplog):
    from engines import fp16
    from engines.trt_build import build_engines

    cuda, use = fakes
    record = use("10.3.0")
    lines: list[str] = []
    opts = EngineOptions(profile=Profile(1, 4, 8), typing="weak")
    files = build_engines(fake_prepared, opts, lines.append, root=tmp_path)
    assert record["parsed"] == ["split-dense.onnx", "split-branch.onnx"] and record["network_flags"] == [0, 0]
    assert record["flags"] == [["FP16"], ["FP16", "SPARSE_WEIGHTS"]]
    assert record["profiles"] == [("input", (1, 3, 4, 4), (4, 3, 4, 4), (8, 3, 4, 4)),
                                  ("start", (1, 2), (4, 2), (8, 2))]
    assert record["workspace"] == 2048 << 20
    assert files["dense"].plan.read_bytes() == b"dense" and files["branch"].plan.read_bytes() == b"branch"
    sparsity = files["branch"].manifest["sparsity"]
    assert (sparsity["inspector"]["layers_sparse"], sparsity["inspector"]["layers_eligible"]) == (1, 2)
    assert (sparsity["log"]["layers_sparse"], sparsity["log"]["layers_eligible"]) == (1, 2)
    assert files["branch"].manifest["split_point"] == {"branch_inputs": ["start"], "branch_output": "embedding_twin",
                                                 "pruned_layers": ["twin/MatMul"]}
    assert "sparsity" not in files["dense"].manifest
    tcache = timing_cache_path("10.3.0", H100, tmp_path)
    assert tcache.read_bytes() == b"branch+dense"  # both builds' timings
    assert "  Building engine (20 steps)" in lines  # steps print every 10 %, at most every 2 s: none here
    assert any(line.startswith("  Building engine: done in ") for line in lines)
    assert any("1 of 2 eligible layers run sparse kernels" in line for line in lines)
    assert (files["branch"].plan.parent / "branch-fp16.layers.json").is_file()
    again = build_engines(fake_prepared, opts, lines.append, root=tmp_path)
    assert again["branch"].manifest == files["branch"].manifest
    assert len(record["parsed"]) == 2  # reused, not rebuilt
    # the default typing is strong, on 10.x too: the FP16 export, no precision flag; the weak engines are rebuilt
    monkeypatch.setattr(fp16, "fp16_model_path", lambda p: p.with_name(p.stem + "-fp16.onnx"))
    tcache.write_bytes(b"refused")  # a timing cache TensorRT refuses: built with an empty one, and replaced
    files = build_engines(fake_prepared, EngineOptions(profile=Profile(1, 4, 8)), lines.append, root=tmp_path)
    assert record["parsed"][2:] == ["split-dense-fp16.onnx", "split-branch-fp16.onnx"]
    assert record["network_flags"][2:] == [32, 32] and record["flags"][2:] == [[], ["SPARSE_WEIGHTS"]]
    assert files["dense"].manifest["typing"] == "strong"
    assert "TensorRT refused the timing cache" in caplog.text and tcache.read_bytes() == b"branch+dense"
    record = use("11.4.0")
    files = build_engines(fake_prepared, EngineOptions(profile=Profile(1, 4, 8)), lines.append, root=tmp_path)
    assert files["dense"].manifest["tensorrt"] == "11.4.0" and len(record["parsed"]) == 6


def test_tensorrt_pair_feeds_the_branch_from_the_dense_engines_device_buffer(fakes, tmp_path):
    from agent.backends.tensorrt import TensorRTPair

    cuda, use = fakes
    record = use("10.3.0")
    (tmp_path / "dense.plan").write_bytes(b"dense")
    (tmp_path / "branch.plan").write_bytes(b"branch")
    pair = TensorRTPair(tmp_path / "dense.plan", tmp_path / "branch.plan")
    x = np.random.default_rng(1).normal(size=(3, 3, 4, 4)).astype(np.float32)
    dense, twin = pair.embed(x)
    expect = np.repeat(x.reshape(3, -1).sum(1, keepdims=True), 5, axis=1)
    assert np.allclose(dense, expect, atol=1e-5) and np.allclose(twin, 2 * expect, atol=1e-5)
    assert cuda.copies == {"htod": 1, "dtoh": 2}  # the branch start never leaves the device
    big = np.random.default_rng(2).normal(size=(11, 3, 4, 4)).astype(np.float32)  # above the profile's max 8
    dense, _ = pair.embed(big)
    assert dense.shape == (11, 5) and np.allclose(dense[:, 0], big.reshape(11, -1).sum(1), atol=1e-4)
    assert cuda.copies == {"htod": 3, "dtoh": 6}
    assert record["executed"][-2:] == [("input", 3), ("start", 3)]


def test_a_failed_cuda_graph_capture_falls_back_to_eager_launches(fakes, tmp_path, caplog):
    """The real cuda-python runtime bindings, no driver here: the capture fails at cudaStreamBeginCapture; scoring
    at a graph batch size still gives the right answers, eagerly, on the graph's own execution contexts."""
    from agent.backends.tensorrt import TensorRTPair

    cuda, use = fakes
    record = use("10.3.0")
    (tmp_path / "dense.plan").write_bytes(b"dense")
    (tmp_path / "branch.plan").write_bytes(b"branch")
    pair = TensorRTPair(tmp_path / "dense.plan", tmp_path / "branch.plan", graph_batches=(4,))
    contexts = record["contexts"]
    x = np.random.default_rng(3).normal(size=(4, 3, 4, 4)).astype(np.float32)
    expect = np.repeat(x.reshape(4, -1).sum(1, keepdims=True), 5, axis=1)
    for _ in range(2):
        dense, twin = pair.embed(x)
        assert np.allclose(dense, expect, atol=1e-5) and np.allclose(twin, 2 * expect, atol=1e-5)
    assert "no CUDA graph for batch 4: capture failed (cudaStreamBeginCapture: cudaError" in caplog.text
    assert record["contexts"] == contexts + 2  # the graph's own contexts, made once
