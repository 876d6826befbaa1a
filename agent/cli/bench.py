"""`bestshot bench score`: faces/s and peak memory of each scoring form, against cv2.dnn in the same run.

Each configuration runs in a fresh process so that its peak RSS is its own.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import platform
import resource
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from agent.backends.tensorrt import TensorRTBackend, TensorRTPair
from engines.gpu import cuda_primary_context, gpu_info
from engines.prepare import PreparedFR
from engines.trt_build import EngineOptions, Profile, build_engines

if TYPE_CHECKING:
    from agent.pipeline.score import Scorer

log = logging.getLogger(__name__)

FORMS = ("dense", "dense+twin", "trunk", "selection", "selection int8")


def _time(fn, batch: np.ndarray, faces: int, warmup: int = 1, min_reps: int = 1) -> float:
    """Milliseconds per face of `fn(batch)` over about `faces` faces, after `warmup` calls."""
    for _ in range(warmup):
        fn(batch)
    reps = max(min_reps, faces // len(batch))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(batch)
    return (time.perf_counter() - t0) * 1000.0 / (reps * len(batch))


def _worker(form: str, batch_size: int, faces: int, recipe: str, threads: int | None, cache: str | None,
            q: mp.Queue) -> None:
    try:
        import cv2

        from agent.backends.onnxruntime import OnnxRuntimeBackend
        from agent.backends.pairs import build_pair
        from agent.common.fr_spec import FACENET
        from engines.prepare import prepare_fr

        batch = np.random.default_rng(0).normal(size=(batch_size, 3, 160, 160)).astype(np.float32)
        if form == "cv2.dnn":
            from engines.wheels import facenet_pb_path

            if threads:
                cv2.setNumThreads(threads)
            net = cv2.dnn.readNetFromTensorflow(str(facenet_pb_path()))

            def run(b):
                for x in b:  # the original graph is pinned to batch 1
                    net.setInput(x[None])
                    net.forward()
        else:
            prepared = prepare_fr(FACENET, recipe, Path(cache) if cache else None)
            if form == "dense":
                run = OnnxRuntimeBackend(prepared.dense, threads).run
            elif form.startswith("selection"):  # the shared trunk, its statistics, ERS and the fused score
                scorer, _ = _selection_scorer(form, recipe, threads, Path(cache) if cache else None, batch_size)

                def run(b):
                    return scorer.selection(scorer.evidence_of(b))
            else:
                pair = build_pair(prepared, "separate" if form == "dense+twin" else "trunk", threads, "onnxruntime")
                run = pair.embed
        ms = _time(run, batch, faces)
        q.put((ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))
    except Exception as e:  # reported by the parent
        q.put(e)


def _selection_scorer(form: str, recipe: str | None, threads: int | None, cache: Path | None, batch: int = 32
                      ) -> tuple[Scorer, PreparedFR]:
    """The agent's scorer for form "selection" (FP32) or "selection int8", with its selection calibration (built by
    the first call, loaded by the timed ones)."""
    from agent.common.fr_spec import FACENET
    from agent.pipeline.detect import DetectorSpec
    from agent.pipeline.score import build_scorer
    from agent.quality.ers_builtin import int8_calibration
    from agent.quality.selection import with_selection

    det = DetectorSpec(threads=threads)
    int8 = int8_calibration(det) if form.endswith("int8") else None
    scorer, prepared = build_scorer(FACENET, recipe, "trunk", threads, batch, cache, "onnxruntime", None, int8)
    with_selection(scorer, prepared, det)
    return scorer, prepared


def _prepare_worker(recipe: str | None, threads: int | None, cache: Path | None, q: mp.Queue) -> None:
    try:
        recipe = str(_selection_scorer("selection", recipe, threads, cache)[1].recipe)
        _selection_scorer("selection int8", recipe, threads, cache)
        q.put(recipe)
    except Exception as e:  # reported by the parent
        q.put(e)


def in_fresh_process(target, args: tuple, what: str):
    """`target(*args, q)` in a spawned process (its own peak RSS): what it put on q; an exception there is raised."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    if isinstance(res, Exception):
        raise RuntimeError(f"{what} failed: {res}") from res
    return res


def _measure(form: str, batch: int, faces: int, recipe: str, threads: int | None, cache: Path | None):
    return in_fresh_process(_worker, (form, batch, faces, recipe, threads, str(cache) if cache else None),
                            f"bench {form} batch {batch}")


def bench_score(recipe: str | None, batches: list[int], faces: int, threads: int | None, cache: Path | None,
                out: TextIO) -> list[dict]:
    # once, outside the timed processes (and in its own, whose peak RSS would pass to the later ones): the models,
    # the INT8 graph and each selection calibration
    recipe = in_fresh_process(_prepare_worker, (recipe, threads, cache), "bench score: preparing the models")
    out.write(f"# bestshot bench score: recipe {recipe}, threads {threads or 'all'}, "
              f"{platform.processor() or platform.machine()}, {mp.cpu_count()} cores\n")
    ref_ms, ref_rss = _measure("cv2.dnn", 1, max(8, faces // 4), recipe, threads, cache)
    out.write(f"reference cv2.dnn (original TF graph, batch 1): {ref_ms:.2f} ms/face, "
              f"{1000 / ref_ms:.1f} faces/s, peak RSS {ref_rss:.0f} MB\n")
    out.write(f"{'form':14s} {'batch':>5s} {'ms/face':>8s} {'faces/s':>8s} {'x cv2.dnn':>9s} {'peak MB':>8s}\n")
    rows = []
    for batch in batches:
        for form in FORMS:
            ms, rss = _measure(form, batch, max(faces, batch), recipe, threads, cache)
            rows.append({"form": form, "batch": batch, "ms_per_face": ms, "peak_rss_mb": rss,
                         "speed_vs_cv2dnn": ref_ms / ms})
            out.write(f"{form:14s} {batch:5d} {ms:8.2f} {1000 / ms:8.1f} {ref_ms / ms:9.2f} {rss:8.0f}\n")
            out.flush()
    for batch in batches:
        by = {r["form"]: r["ms_per_face"] for r in rows if r["batch"] == batch}
        sep, trunk = by["dense+twin"] / by["dense"] - 1, by["trunk"] / by["dense"] - 1
        out.write(f"batch {batch}: cost over dense: separate twin {sep:+.0%}, shared trunk {trunk:+.0%}, "
                  f"selection score {by['selection'] / by['dense']:.2f}x the dense pass, with INT8 "
                  f"{by['selection int8'] / by['dense']:.2f}x\n")
    return rows


def _pipeline_run(source: str, budget: float | None, detect_input: int, detect_every: int, threads: int | None,
                  trace: Path) -> tuple[dict, dict[int, tuple[int, float]]]:
    """One in-process run of the agent on `source`; (figures, {track: (published frame, quality)})."""
    import json

    import av

    from agent.service.config import parse_config
    from agent.service.process import Agent

    with av.open(source) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate or 25)
    cfg = parse_config({
        "cameras": [{"id": "bench", "url": source, "detector": {"input_size": detect_input},
                     "detect_every": detect_every}],
        "scoring": {"budget": budget, "threads": threads},
        "publisher": {"endpoint": "tcp://127.0.0.1:*"},
        "metrics": {"listen": None},
    })
    agent = Agent(cfg, trace)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    summary = agent.run()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    times = agent.pipeline.times
    shots = {}
    for line in trace.read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "published":
            shots[rec["track_id"]] = (rec["frame_index"], rec["quality"])
    return {
        "frames": summary.frames, "seconds": summary.seconds, "fps": summary.frames / summary.seconds,
        "realtime_ratio": summary.frames / fps / summary.seconds, "source_fps": fps,
        "stage_ms_per_frame": {k: times.ms[k] / max(1, summary.frames) for k in
                               ("decode", "detect", "track", "align", "score", "publish") if k in times.ms},
        "score_ms_per_face": times.ms["score"] / max(1, times.n["score"]),
        "faces_detected": summary.detections, "faces_scored": summary.scored,
        "faces_scored_per_s": summary.scored / summary.seconds, "shots": summary.published,
        "cpu_percent": 100.0 * cpu / summary.seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "end_to_message_ms_median": summary.end_latency_ms_median,
        "flush_to_message_ms_median": summary.flush_latency_ms_median,
    }, shots


def bench_pipeline(source: str | None, budget: float | None, detect_input: int, detect_every: int,
                   threads: int | None, compare_unlimited: bool, out: TextIO) -> dict:
    import tempfile

    if source is None:
        from agent.pipeline.sources.demo import demo_clip_path

        source = str(demo_clip_path())
    with tempfile.TemporaryDirectory() as tmp:
        res, shots = _pipeline_run(source, budget, detect_input, detect_every, threads, Path(tmp) / "trace.jsonl")
        out.write(f"# bestshot bench pipeline: {source}\n# {platform.processor() or platform.machine()}, "
                  f"{mp.cpu_count()} cores, threads {threads or 'all'}, scoring budget "
                  f"{budget if budget else 'unlimited'} faces/s, detector input {detect_input}, "
                  f"detection on every {detect_every}. frame\n")
        out.write(f"frames {res['frames']} in {res['seconds']:.1f} s: {res['fps']:.1f} frames/s = "
                  f"{res['realtime_ratio']:.2f}x real time ({res['source_fps']:.2f} fps source)\n")
        out.write("per-stage ms per frame: " + ", ".join(f"{k} {v:.1f}" for k, v in res["stage_ms_per_frame"].items())
                  + f"; score {res['score_ms_per_face']:.1f} ms per face\n")
        out.write(f"faces detected {res['faces_detected']}, scored {res['faces_scored']} "
                  f"({res['faces_scored_per_s']:.1f}/s), shots {res['shots']}; CPU {res['cpu_percent']:.0f} %, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB; track end -> message median "
                  f"{res['end_to_message_ms_median'] or float('nan'):.1f} ms (tracks flushed at the end "
                  f"{res['flush_to_message_ms_median'] or float('nan'):.1f} ms)\n")
        if compare_unlimited and budget:
            ref, ref_shots = _pipeline_run(source, None, detect_input, detect_every, threads, Path(tmp) / "ref.jsonl")
            common = sorted(set(shots) & set(ref_shots))
            changed = [t for t in common if shots[t][0] != ref_shots[t][0]]
            loss = [ref_shots[t][1] - shots[t][1] for t in common]
            res["unlimited"] = {"fps": ref["fps"], "realtime_ratio": ref["realtime_ratio"],
                                "tracks_compared": len(common), "shots_changed": len(changed),
                                "mean_quality_gain_unlimited": float(np.mean(loss)) if loss else 0.0}
            out.write(f"unlimited scoring: {ref['realtime_ratio']:.2f}x real time, {ref['faces_scored']} faces "
                      f"scored; the published shot changes for {len(changed)} of {len(common)} tracks "
                      f"(mean quality gain {res['unlimited']['mean_quality_gain_unlimited']:+.4f})\n")
    return res


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


def bench_score_gpu(prepared: PreparedFR, backend: str = "tensorrt", batches: Sequence[int] = (1, 8, 32, 128),
                    faces: int = 2048, opts: EngineOptions | None = None) -> dict:
    """`bestshot bench score --backend tensorrt|onnxruntime-cuda`: faces/s of the dense model alone and of the pair
    (dense + quality) at each batch size, the quality's share of the time, and the GPU memory each configuration
    uses. Configurations are loaded one at a time (each released before the next), so an 8 GB Orin holds one
    and the memory figures are each its own."""
    import gc

    from agent.backends.pairs import build_pair

    if backend == "tensorrt":
        base = opts or EngineOptions()
        opts = EngineOptions(base.precision, Profile(1, base.profile.opt, max(base.profile.max, *batches)),
                             base.typing, base.workspace_mb, base.read_only)
        files = build_engines(prepared, opts)
        configs = {"dense": lambda: TensorRTBackend(files["dense"].plan).run,
                   "pair": lambda: TensorRTPair(files["dense"].plan, files["branch"].plan).embed}
    elif backend == "onnxruntime-cuda":
        from agent.backends.onnxruntime import OnnxRuntimeCudaBackend
        from engines.fp16 import fp16_model_path

        configs = {"dense": lambda: OnnxRuntimeCudaBackend(fp16_model_path(prepared.dense)).run,
                   "pair": lambda: build_pair(prepared, "trunk", backend="onnxruntime-cuda").embed}
    else:
        raise ValueError(f"bench_score_gpu: backend {backend!r} is not a GPU backend")
    size = prepared.spec.input_size
    xs = {b: np.random.default_rng(b).normal(size=(b, 3, size, size)).astype(np.float32) for b in batches}
    ms: dict[str, dict[int, float]] = {}
    memory: dict[str, float | None] = {}
    before = _gpu_memory_used_mb()
    for name, make in configs.items():
        fn = make()
        memory[name] = _gpu_memory_used_mb()
        ms[name] = {b: _time(fn, x, faces, warmup=3, min_reps=5) for b, x in xs.items()}
        del fn
        gc.collect()
        log.info("%s: %s", name, {b: round(1000.0 / v, 1) for b, v in ms[name].items()})
    rows = [{"batch": b, "dense_faces_per_s": round(1000.0 / ms["dense"][b], 1),
             "pair_faces_per_s": round(1000.0 / ms["pair"][b], 1),
             "quality_over_dense_time": round(ms["pair"][b] / ms["dense"][b] - 1.0, 3)} for b in batches]
    used = {k: None if v is None or before is None else round(v - before, 1) for k, v in memory.items()}
    return {"backend": backend, "gpu": gpu_info().name, "gpu_memory_mb": used, "rows": rows}
