"""TensorRT engines for the FR pair: a dense engine and a 2:4-sparse engine (sparse weights enabled).

Layout (beside the prepared ONNX, see engines/prepare.py):
    fr/<name>-<sha12>/engines/dense-<precision>.plan + .json (manifest) + .layers.json (inspector)
    fr/<name>-<sha12>/<recipe>/engines/sparse-<precision>.plan + .json + .layers.json
    trt/timing-<trt version>-sm<cc>.cache       (timing cache shared by every build on that GPU)

The manifest holds the cache key (TensorRT version, GPU name and compute capability, model, ONNX sha256,
recipe, precision, typing, batch profile). A mismatch rebuilds, or in a read-only deployment raises
EngineMismatch naming what differs. Builds run under a file lock, so two processes never build the same
engine: the second waits and reuses the first one's plan.

TensorRT APIs (written to NVIDIA's documented Python API; see docs/GPU.md for what ran where):
- 10.x (JetPack 6 ships 10.3): `builder.create_network(0)` (explicit batch is implicit in 10.x), weak
  typing with `BuilderFlag.FP16` (and `INT8` + an IInt8EntropyCalibrator2) on the FP32 ONNX.
- 11.x: every network is strongly typed (the precision flags and implicit INT8 calibration are gone), so
  the builder gets the FP16 ONNX from engines/fp16.py.
Both: `SPARSE_WEIGHTS` for the twin, a dynamic-batch optimisation profile, `set_memory_pool_limit`,
a persisted ITimingCache, ProfilingVerbosity.DETAILED so that the engine inspector shows the tactics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from agent.common.cache import atomic_write, cache_root, locked, read_json, sha256_file, write_json
from engines.prepare import PreparedFR

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
FP16_EXPORT_VERSION = 1  # bump when engines/fp16.py changes what it writes
PRECISIONS = ("fp16", "int8")
TYPINGS = ("auto", "weak", "strong")
KINDS = ("dense", "sparse")
Progress = Callable[[str], None]


class EngineError(RuntimeError):
    """An engine cannot be built or loaded; the message says why."""


class EngineMismatch(EngineError):
    """A read-only deployment found no engine, or one built for something else."""


@dataclass(frozen=True)
class Profile:
    """The dynamic-batch optimisation profile: TensorRT tunes for `opt` and accepts min..max."""

    min: int = 1
    opt: int = 32
    max: int = 128

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) for v in (self.min, self.opt, self.max)):
            raise ValueError(f"batch profile {self}: sizes must be integers")
        if not 1 <= self.min <= self.opt <= self.max <= 4096:
            raise ValueError(f"batch profile {self.min}/{self.opt}/{self.max}: need 1 <= min <= opt <= max <= 4096")

    def shapes(self, chw: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return (self.min, *chw), (self.opt, *chw), (self.max, *chw)


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp16"
    profile: Profile = field(default_factory=Profile)
    typing: str = "auto"  # auto = weak on TensorRT 10, strong on 11+
    workspace_mb: int = 2048
    read_only: bool = False  # never build: refuse (EngineMismatch) when the engine is missing or stale

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"engine precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.typing not in TYPINGS:
            raise ValueError(f"engine typing {self.typing!r}: use one of {', '.join(TYPINGS)}")
        if self.workspace_mb < 64:
            raise ValueError("engine workspace_mb must be at least 64")


@dataclass
class EngineFile:
    kind: str
    plan: Path
    manifest: dict


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def resolve_typing(opts: EngineOptions, trt_version: str) -> str:
    """'weak' (precision flags on the FP32 ONNX) or 'strong' (the FP16 ONNX decides), checked against TensorRT."""
    major = trt_major(trt_version)
    typing = opts.typing if opts.typing != "auto" else ("strong" if major >= 11 else "weak")
    if typing == "weak" and major >= 11:
        raise EngineError(f"TensorRT {trt_version} has no weakly typed networks (removed in 11.0): use typing auto")
    if opts.precision == "int8" and typing == "strong":
        raise EngineError(
            f"INT8 needs implicit calibration (weak typing, TensorRT 10.x); TensorRT {trt_version} with strong "
            "typing only takes explicitly quantised (Q/DQ) ONNX, which bestshot does not produce: use fp16"
        )
    return typing


def engine_fields(prepared: PreparedFR, kind: str, opts: EngineOptions, trt_version: str, gpu_name: str,
                  compute_capability: str) -> dict:
    """The cache key of one engine: everything that makes a plan valid or not for this run."""
    typing = resolve_typing(opts, trt_version)
    man = prepared.manifest
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": kind,
        "model": prepared.spec.name,
        "recipe": str(prepared.recipe) if kind == "sparse" else None,
        "onnx_sha256": man["twin_sha256"] if kind == "sparse" else man["dense_sha256"],
        "fp16_export": FP16_EXPORT_VERSION if typing == "strong" else None,
        "precision": opts.precision,
        "typing": typing,
        "profile": [opts.profile.min, opts.profile.opt, opts.profile.max],
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "compute_capability": compute_capability,
    }


def mismatches(manifest: dict | None, fields: dict) -> list[str]:
    """One 'key: built for X, this run needs Y' line per differing field ([] = the engine fits)."""
    if not manifest:
        return ["no engine built yet"]
    return [f"{k}: built for {manifest.get(k)!r}, this run needs {v!r}" for k, v in fields.items()
            if manifest.get(k) != v]


def plan_path(prepared: PreparedFR, kind: str, precision: str) -> Path:
    onnx_path = prepared.twin if kind == "sparse" else prepared.dense
    return onnx_path.parent / "engines" / f"{kind}-{precision}.plan"


def ensure_engine(plan: Path, fields: dict, read_only: bool,
                  build: Callable[[], tuple[bytes, dict]], progress: Progress) -> EngineFile:
    """Reuse the plan at `plan` if its manifest matches `fields`, else build it (under a lock), or refuse."""
    mpath = plan.with_suffix(".json")
    with locked(plan):
        manifest = read_json(mpath)
        diff = mismatches(manifest, fields)
        if not diff and not (plan.is_file() and sha256_file(plan) == manifest.get("plan_sha256")):
            diff = ["the plan file is missing or does not match its manifest"]
        if not diff:
            progress(f"{fields['kind']} engine: reusing {plan}")
            return EngineFile(fields["kind"], plan, manifest)
        if read_only:
            raise EngineMismatch(
                f"{fields['kind']} engine {plan} cannot be used and this deployment is read-only: " + "; ".join(diff)
                + ". Build the engines on this device (`bestshot build-engines`) with the deployed configuration"
            )
        progress(f"{fields['kind']} engine: building ({'; '.join(diff)})")
        data, extra = build()
        plan.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(plan, lambda p: p.write_bytes(data))
        manifest = {**fields, **extra, "plan_sha256": sha256_file(plan), "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(mpath, manifest)
        return EngineFile(fields["kind"], plan, manifest)


# --- proof of sparsity: the builder's log and the engine inspector ---------------------------------------

# TensorRT 8.x-10.x builders print these two INFO lines when SPARSE_WEIGHTS is set (quoted in NVIDIA/TensorRT
# issues #1403, #2169 and #4056, e.g. "[I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_22, MatMul_51"
# and "(Sparsity) TRT inference plan picked sparse implementation for layers: Conv_22"). Layer names are the
# fused engine layers ("Conv_619 + Relu_620"), separated by ", ".
_ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)$")
_PICKED = re.compile(r"\(Sparsity\) TRT inference plan pick(?:s|ed) sparse implementation for layers:(.*)$")
# Sparse tactics carry "sparse" in their kernel name (e.g. sm80_xmma_fprop_avdt_sparse_int8int8_...).
_SPARSE_TACTIC = re.compile(r"sparse", re.IGNORECASE)


@dataclass
class SparsityReport:
    source: str
    eligible: list[str]
    sparse: list[str]

    def summary(self) -> dict:
        return {"source": self.source, "layers_eligible": len(self.eligible), "layers_sparse": len(self.sparse),
                "eligible": self.eligible, "sparse": self.sparse}


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(", ") if n.strip()]


def parse_sparsity_log(lines: list[str]) -> SparsityReport | None:
    """The builder's (Sparsity) lines -> eligible and picked layers; None when the log has none."""
    eligible = picked = None
    for line in lines:
        if m := _ELIGIBLE.search(line.rstrip()):
            eligible = _names(m[1])
        elif m := _PICKED.search(line.rstrip()):
            picked = _names(m[1])
    if eligible is None and picked is None:
        return None
    return SparsityReport("builder log", eligible or [], picked or [])


def parse_inspector(info: str | dict) -> SparsityReport:
    """Engine inspector JSON (ProfilingVerbosity.DETAILED) -> layers with 2:4 weights, and those on sparse tactics.

    Format (TensorRT 10.x, "Layers" + "Bindings"; 11.x keeps "Layers" and replaces "Bindings" with "I/O
    Tensors"): each layer is an object with "Name", "LayerType", ..., "HasSparseWeights": 0|1 on convolutions
    and GEMMs, and "TacticName" (see NVIDIA's Engine Inspector documentation and NVIDIA/TensorRT issue #4020).
    """
    data = json.loads(info) if isinstance(info, str) else info
    layers = data.get("Layers", [])
    if layers and not all(isinstance(layer, dict) for layer in layers):
        raise ValueError("the engine was not built with ProfilingVerbosity.DETAILED: the inspector lists names only")
    eligible, sparse = [], []
    for layer in layers:
        on_sparse = bool(_SPARSE_TACTIC.search(str(layer.get("TacticName", ""))))
        if layer.get("HasSparseWeights") in (1, True) or on_sparse:
            eligible.append(layer.get("Name", "?"))
        if on_sparse:
            sparse.append(layer.get("Name", "?"))
    return SparsityReport("engine inspector", eligible, sparse)


# --- the TensorRT build ------------------------------------------------------------------------------------

def _trt_logger(trt):
    class Logger(trt.ILogger):
        """Forwards TensorRT's messages to logging and keeps the (Sparsity) lines and the errors."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.sparsity: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if "(Sparsity)" in msg:
                self.sparsity.append(msg)
            if level <= 1:
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif level == 2:
                log.warning("TensorRT: %s", msg)
            elif level == 3:
                log.debug("TensorRT: %s", msg)

    return Logger()


def _progress_monitor(trt, progress: Progress):
    class Monitor(trt.IProgressMonitor):
        """Top-level phases on the console (start, done), and long phases' steps every 10 % (at most every 2 s)."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.lock = threading.Lock()
            self.phases: dict[str, list] = {}  # name -> [steps, top level, started, last line]

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            now = time.monotonic()
            with self.lock:
                self.phases[phase_name] = [num_steps, parent_phase is None, now, now]
            if parent_phase is None:
                progress(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self.lock:
                total, _, _, last = self.phases.get(phase_name, [0, False, 0.0, 0.0])
                now = time.monotonic()
                if total >= 10 and (step + 1) % max(1, total // 10) == 0 and now - last >= 2.0:
                    self.phases[phase_name][3] = now
                    progress(f"    {phase_name}: {step + 1}/{total}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                _, top, started, _ = self.phases.pop(phase_name, [0, False, 0.0, 0.0])
            if top:
                progress(f"  {phase_name}: done in {time.monotonic() - started:.1f} s")

    return Monitor()


def _calibrator(trt, faces: np.ndarray, batch: int, cache: Path):
    """IInt8EntropyCalibrator2 over preprocessed face crops (TensorRT 10.x only; removed in 11)."""
    import pycuda.driver as cuda

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.device = cuda.mem_alloc(np.ascontiguousarray(faces[:batch], np.float32).nbytes)

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index + batch > len(faces):
                return None
            cuda.memcpy_htod(self.device, np.ascontiguousarray(faces[self.index:self.index + batch], np.float32))
            self.index += batch
            return [int(self.device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            atomic_write(cache, lambda p: p.write_bytes(bytes(data)))

    return Calibrator()


def timing_cache_path(trt_version: str, compute_capability: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "trt" / f"timing-{trt_version}-sm{compute_capability.replace('.', '')}.cache"


def build_plan(onnx_path: Path, kind: str, opts: EngineOptions, typing: str, out_dir: Path, timing_cache: Path,
               progress: Progress, calib: np.ndarray | None = None) -> tuple[bytes, dict]:
    """Build one serialized engine from `onnx_path`; returns the plan and the manifest's build facts.

    `out_dir` (the engines folder) receives the inspector's layer JSON and the INT8 calibration cache."""
    import tensorrt as trt

    from engines.gpu import cuda_primary_context

    t0 = time.monotonic()
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(strong) if typing == "strong" and strong is not None else 0)
    parser = trt.OnnxParser(network, logger)
    progress(f"{kind} engine: parsing {onnx_path}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
    if network.num_inputs != 1:
        raise EngineError(f"{onnx_path}: the FR model must have one input, has {network.num_inputs}")
    inp = network.get_input(0)
    if inp.shape[0] != -1:
        raise EngineError(f"{onnx_path}: input {inp.name} has a fixed batch size {inp.shape[0]}; need a dynamic one")
    chw = tuple(int(d) for d in inp.shape[1:])

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if typing == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
    if kind == "sparse":
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, *opts.profile.shapes(chw))
    config.add_optimization_profile(profile)
    if opts.precision == "int8":
        if calib is None or len(calib) < opts.profile.opt:
            raise EngineError(f"INT8 needs at least {opts.profile.opt} calibration faces (the profile's opt batch)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(profile)
    previous = timing_cache.read_bytes() if timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(previous), False)
    monitor = _progress_monitor(trt, progress) if hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:  # the monitor must outlive the build: `monitor` holds it until we return
        config.progress_monitor = monitor
    progress(f"{kind} engine: building ({opts.precision}, {typing} typing, batch "
             f"{opts.profile.min}/{opts.profile.opt}/{opts.profile.max}); this takes minutes")
    with cuda_primary_context() if opts.precision == "int8" else contextlib.nullcontext():
        if opts.precision == "int8":  # the calibrator's device buffer needs a current CUDA context
            calibrator = _calibrator(trt, calib, opts.profile.opt, out_dir / f"{kind}-int8.calib")
            config.int8_calibrator = calibrator
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = "; ".join(logger.errors[-3:]) or "no error logged"
        raise EngineError(f"TensorRT could not build the {kind} engine: {errors}")
    data = bytes(plan)
    _save_timing_cache(trt, config, timing_cache)

    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    layers_json = out_dir / f"{kind}-{opts.precision}.layers.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(layers_json, lambda p: p.write_text(info))
    extra = {"input": inp.name, "input_chw": list(chw), "onnx": str(onnx_path), "layers_json": str(layers_json),
             "engine_layers": engine.num_layers, "seconds": round(time.monotonic() - t0, 1)}
    if kind == "sparse":
        from_log = parse_sparsity_log(logger.sparsity)
        inspected = parse_inspector(info)
        extra["sparsity"] = {"inspector": inspected.summary(), "log": from_log.summary() if from_log else None}
        progress(f"sparse engine: {len(inspected.sparse)} of {len(inspected.eligible)} eligible layers run sparse "
                 f"kernels" + (f" (builder log: {len(from_log.sparse)}/{len(from_log.eligible)})" if from_log else ""))
    progress(f"{kind} engine: built in {extra['seconds']} s")
    return data, extra


def _save_timing_cache(trt, config, path: Path) -> None:
    """Merge this build's timings into the shared cache file (other builds may have added to it meanwhile)."""
    with locked(path):
        merged = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        merged.combine(config.get_timing_cache(), False)
        data = bytes(merged.serialize())
        atomic_write(path, lambda p: p.write_bytes(data))


def build_engines(prepared: PreparedFR, opts: EngineOptions | None = None, progress: Progress | None = None,
                  calib: np.ndarray | None = None, root: Path | None = None) -> dict[str, EngineFile]:
    """Build (or reuse) the dense and the sparse engine of `prepared` on this machine's GPU.

    `calib`: preprocessed face crops (N, C, H, W) float32 for INT8 calibration. `progress`: one call per
    console line (default: logging at INFO). Raises EngineError (EngineMismatch when read-only).
    """
    import tensorrt as trt

    from engines.fp16 import fp16_model_path
    from engines.gpu import gpu_info

    opts = opts or EngineOptions()
    say = progress or (lambda line: log.info("%s", line))
    gpu = gpu_info()
    if float(gpu.compute_capability) < 8.0:
        log.warning("%s (sm%s) has no sparse tensor cores (Ampere, sm80, and later): the sparse engine will run "
                    "dense kernels", gpu.name, gpu.compute_capability)
    tcache = timing_cache_path(trt.__version__, gpu.compute_capability, root)
    out: dict[str, EngineFile] = {}
    for kind in KINDS:
        fields = engine_fields(prepared, kind, opts, trt.__version__, gpu.name, gpu.compute_capability)
        source = prepared.twin if kind == "sparse" else prepared.dense
        plan = plan_path(prepared, kind, opts.precision)

        def build(kind: str = kind, source: Path = source, plan: Path = plan, typing: str = fields["typing"]
                  ) -> tuple[bytes, dict]:
            onnx_path = fp16_model_path(source) if typing == "strong" else source
            return build_plan(onnx_path, kind, opts, typing, plan.parent, tcache, say, calib)

        out[kind] = ensure_engine(plan, fields, opts.read_only, build, say)
    return out


# --- `bestshot models` ----------------------------------------------------------------------------------------

def engine_report(prepared: PreparedFR, opts: EngineOptions | None = None) -> dict:
    """What `bestshot models` shows about the engines, without building anything.

    Each engine: path, whether built, its manifest's key facts, sparse/eligible layers, and (when TensorRT and
    a GPU are present here) whether it fits this machine and configuration.
    """
    opts = opts or EngineOptions()
    try:
        import tensorrt as trt

        from engines.gpu import gpu_info

        gpu = gpu_info()
        env: tuple[str, str, str] | None = (trt.__version__, gpu.name, gpu.compute_capability)
        checked = f"TensorRT {env[0]} on {env[1]} (sm{env[2]})"
    except ImportError as e:
        env, checked = None, f"not checked here: no TensorRT ({e})"
    except Exception as e:  # no GPU, no driver: cannot check here
        env, checked = None, f"not checked here: {e}"
    engines = []
    for kind in KINDS:
        plan = plan_path(prepared, kind, opts.precision)
        man = read_json(plan.with_suffix(".json")) if plan.is_file() else None
        entry: dict = {"kind": kind, "path": str(plan), "built": man is not None}
        if man:
            entry.update({k: man.get(k) for k in ("precision", "typing", "profile", "tensorrt", "gpu",
                                                   "compute_capability", "seconds")})
            entry["built_at"] = man.get("built")
            insp = (man.get("sparsity") or {}).get("inspector")
            if insp:
                entry["layers_sparse"], entry["layers_eligible"] = insp["layers_sparse"], insp["layers_eligible"]
        if env:
            try:
                stale = mismatches(man, engine_fields(prepared, kind, opts, *env))
            except EngineError as e:
                stale = [str(e)]
            entry["status"] = "ok" if not stale else "rebuild needed: " + "; ".join(stale)
        else:
            entry["status"] = checked
        engines.append(entry)
    return {"environment": checked, "options": asdict(opts), "engines": engines}


def engine_lines(report: dict) -> list[str]:
    """`engine_report` as console lines."""
    lines = [f"TensorRT engines ({report['environment']}):"]
    for e in report["engines"]:
        if not e["built"]:
            lines.append(f"  {e['kind']:6s} not built ({e['path']}); status: {e['status']}")
            continue
        sparse = (f", {e['layers_sparse']}/{e['layers_eligible']} layers sparse/eligible"
                  if "layers_sparse" in e else "")
        lines.append(f"  {e['kind']:6s} {e['path']}: {e['precision']} ({e['typing']} typing), batch "
                     f"{'/'.join(map(str, e['profile']))}, TensorRT {e['tensorrt']} on {e['gpu']} "
                     f"(sm{e['compute_capability']}){sparse}; status: {e['status']}")
    return lines
