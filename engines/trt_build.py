"""TensorRT engines for the FR pair, split at the branch point (engines/split.py): a dense engine (the dense
model, with the branch-start activations as a second output) and a branch engine (the pruned branch alone,
2:4 sparse weights enabled) that reads the dense engine's output buffer on the device.

Layout (beside the prepared ONNX, see engines/prepare.py; both depend on the recipe, which sets the split point):
    fr/<name>-<sha12>/<recipe>/engines/dense-fp16.plan + .json (manifest) + .layers.json (inspector)
    fr/<name>-<sha12>/<recipe>/engines/branch-fp16.plan + .json + .layers.json
    trt/timing-<trt version>-sm<cc>.cache       (timing cache shared by every build on that GPU model)

The manifest holds the cache key (TensorRT version, GPU name, compute capability, SM count and memory (Orin
modules share one name), model, split graphs, recipe, precision, typing, batch profile) and records the split
point and which branch layers run sparse kernels. A mismatch rebuilds, or in a read-only deployment raises
EngineMismatch naming what differs. Builds run under a file lock, so two processes never build the same
engine: the second waits and reuses the first one's plan.

TensorRT APIs (written to NVIDIA's documented Python API; see docs/GPU.md for what ran where): strongly typed
networks (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`, 10.3 and later) built from the FP16 export
(engines/fp16.py), so the L2 tail it keeps in FP32 stays FP32 (a weakly typed FP16 build may run it in FP16);
`typing: weak` (`BuilderFlag.FP16` on the FP32 ONNX) remains for 10.x. `SPARSE_WEIGHTS` for the branch, a
dynamic-batch optimisation profile, `set_memory_pool_limit`, a persisted ITimingCache (its `set_timing_cache`
and `combine` results checked), ProfilingVerbosity.DETAILED so that the engine inspector shows the tactics.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.common.cache import atomic_write, cache_root, locked, read_json, sha256_file, write_json
from engines.gpu import GpuInfo
from engines.prepare import PreparedFR
from engines.split import SPLIT_VERSION, Split, split_pair

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: split engines (dense + branch)
FP16_EXPORT_VERSION = 1  # bump when engines/fp16.py changes what it writes
PRECISIONS = ("fp16",)  # INT8 needs calibration crops no caller had: removed (docs/GPU.md)
TYPINGS = ("auto", "weak", "strong")
KINDS = ("dense", "branch")
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
    typing: str = "auto"  # auto = strong (the FP16 export decides each tensor's type); weak: TensorRT 10.x only
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
    typing = "strong" if opts.typing == "auto" else opts.typing
    if typing == "weak" and major >= 11:
        raise EngineError(f"TensorRT {trt_version} has no weakly typed networks (removed in 11.0): use typing auto")
    return typing


def engine_fields(prepared: PreparedFR, kind: str, opts: EngineOptions, trt_version: str, gpu: GpuInfo) -> dict:
    """The cache key of one engine: everything that makes a plan valid or not for this run. The GPU is its name,
    compute capability, SM count and memory: every Jetson Orin module reports the same name."""
    typing = resolve_typing(opts, trt_version)
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": kind,
        "model": prepared.spec.name,
        "recipe": str(prepared.recipe),
        "pair_sha256": prepared.manifest["pair_sha256"],
        "split": SPLIT_VERSION,
        "fp16_export": FP16_EXPORT_VERSION if typing == "strong" else None,
        "precision": opts.precision,
        "typing": typing,
        "profile": [opts.profile.min, opts.profile.opt, opts.profile.max],
        "tensorrt": trt_version,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "sm_count": gpu.sm_count,
        "memory_mb": gpu.memory_mb,
    }


def mismatches(manifest: dict | None, fields: dict) -> list[str]:
    """One 'key: built for X, this run needs Y' line per differing field ([] = the engine fits)."""
    if not manifest:
        return ["no engine built yet"]
    return [f"{k}: built for {manifest.get(k)!r}, this run needs {v!r}" for k, v in fields.items()
            if manifest.get(k) != v]


def plan_path(prepared: PreparedFR, kind: str, precision: str) -> Path:
    return prepared.dir / "engines" / f"{kind}-{precision}.plan"


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


def timing_cache_path(trt_version: str, gpu: GpuInfo, root: Path | None = None) -> Path:
    """Timings are per GPU model: keyed like the engines (compute capability, SM count, memory)."""
    cc = gpu.compute_capability.replace(".", "")
    return (root or cache_root()) / "trt" / f"timing-{trt_version}-sm{cc}-{gpu.sm_count}sm-{gpu.memory_mb}mb.cache"


def build_plan(onnx_path: Path, kind: str, opts: EngineOptions, typing: str, out_dir: Path, timing_cache: Path,
               progress: Progress) -> tuple[bytes, dict]:
    """Build one serialized engine from `onnx_path`; returns the plan and the manifest's build facts.

    `out_dir` (the engines folder) receives the inspector's layer JSON."""
    import tensorrt as trt

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
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for inp in inputs:
        if inp.shape[0] != -1:
            raise EngineError(f"{onnx_path}: input {inp.name} has a fixed batch size {inp.shape[0]}; "
                              "need a dynamic one")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if typing == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
    if kind == "branch":
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    for inp in inputs:
        profile.set_shape(inp.name, *opts.profile.shapes(tuple(int(d) for d in inp.shape[1:])))
    config.add_optimization_profile(profile)
    merge = _load_timing_cache(config, timing_cache)
    monitor = _progress_monitor(trt, progress) if hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:  # the monitor must outlive the build: `monitor` holds it until we return
        config.progress_monitor = monitor
    progress(f"{kind} engine: building ({opts.precision}, {typing} typing, batch "
             f"{opts.profile.min}/{opts.profile.opt}/{opts.profile.max}); this takes minutes")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = "; ".join(logger.errors[-3:]) or "no error logged"
        raise EngineError(f"TensorRT could not build the {kind} engine: {errors}")
    data = bytes(plan)
    _save_timing_cache(config, timing_cache, merge)

    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    layers_json = out_dir / f"{kind}-{opts.precision}.layers.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(layers_json, lambda p: p.write_text(info))
    extra = {"inputs": {i.name: [int(d) for d in i.shape[1:]] for i in inputs}, "onnx": str(onnx_path),
             "layers_json": str(layers_json), "engine_layers": engine.num_layers,
             "seconds": round(time.monotonic() - t0, 1)}
    if kind == "branch":
        from_log = parse_sparsity_log(logger.sparsity)
        inspected = parse_inspector(info)
        extra["sparsity"] = {"inspector": inspected.summary(), "log": from_log.summary() if from_log else None}
        progress(f"branch engine: {len(inspected.sparse)} of {len(inspected.eligible)} eligible layers run sparse "
                 f"kernels" + (f" (builder log: {len(from_log.sparse)}/{len(from_log.eligible)})" if from_log else ""))
    progress(f"{kind} engine: built in {extra['seconds']} s")
    return data, extra


def _load_timing_cache(config, path: Path) -> bool:
    """Give the build the shared timings (True); a cache TensorRT refuses (another version, corrupt) is replaced by
    an empty one, with a warning, rather than silently ignored (False)."""
    previous = path.read_bytes() if path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(previous), False):
        return True
    log.warning("TensorRT refused the timing cache %s; building with an empty one (it is replaced afterwards)", path)
    if not config.set_timing_cache(config.create_timing_cache(b""), False):
        raise EngineError("TensorRT refused an empty timing cache")
    return False


def _save_timing_cache(config, path: Path, merge: bool) -> None:
    """Merge this build's timings into the shared cache file (other builds may have added to it meanwhile), or
    replace the file when `merge` is False (TensorRT refused it)."""
    with locked(path):
        merged = config.get_timing_cache()
        if merge:
            merged = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        if merge and not merged.combine(config.get_timing_cache(), False):
            log.warning("TensorRT could not merge into the timing cache %s (another TensorRT or GPU?): replacing it",
                        path)
            merged = config.get_timing_cache()
        data = bytes(merged.serialize())
        atomic_write(path, lambda p: p.write_bytes(data))


def build_engines(prepared: PreparedFR, opts: EngineOptions | None = None, progress: Progress | None = None,
                  root: Path | None = None) -> dict[str, EngineFile]:
    """Build (or reuse) the dense and the branch engine of `prepared` on this machine's GPU.

    `progress`: one call per console line (default: logging at INFO). Raises EngineError (EngineMismatch when
    read-only).
    """
    import tensorrt as trt

    from engines.fp16 import fp16_model_path
    from engines.gpu import gpu_info

    opts = opts or EngineOptions()
    say = progress or (lambda line: log.info("%s", line))
    gpu = gpu_info()
    if float(gpu.compute_capability) < 8.0:
        log.warning("%s (sm%s) has no sparse tensor cores (Ampere, sm80, and later): the branch engine will run "
                    "dense kernels", gpu.name, gpu.compute_capability)
    tcache = timing_cache_path(trt.__version__, gpu, root)
    split: Split | None = None
    out: dict[str, EngineFile] = {}
    for kind in KINDS:
        fields = engine_fields(prepared, kind, opts, trt.__version__, gpu)
        plan = plan_path(prepared, kind, opts.precision)

        def build(kind: str = kind, plan: Path = plan, typing: str = fields["typing"]) -> tuple[bytes, dict]:
            nonlocal split
            split = split or split_pair(prepared.pair)
            source = split.dense if kind == "dense" else split.branch
            onnx_path = fp16_model_path(source) if typing == "strong" else source
            data, extra = build_plan(onnx_path, kind, opts, typing, plan.parent, tcache, say)
            point = {"branch_inputs": split.branch_inputs, "branch_output": split.branch_output,
                     "pruned_layers": split.sparse_layers}
            return data, {**extra, "split_point": point}

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
        env: tuple[str, GpuInfo] | None = (trt.__version__, gpu)
        checked = f"TensorRT {trt.__version__} on {gpu.name} (sm{gpu.compute_capability})"
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
