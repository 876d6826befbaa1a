"""`bestshot bench score`: faces/s and peak memory of each scoring form, against cv2.dnn in the same run.

Each configuration runs in a fresh process so that its peak RSS is its own.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path
from typing import TextIO

import numpy as np

FORMS = ("dense", "dense+twin", "trunk")


def _time(fn, batch: np.ndarray, faces: int) -> float:
    fn(batch)  # warm-up
    reps = max(1, faces // len(batch))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(batch)
    return (time.perf_counter() - t0) * 1000.0 / (reps * len(batch))


def _worker(form: str, batch_size: int, faces: int, recipe: str, threads: int | None, cache: str | None,
            q: mp.Queue) -> None:
    try:
        import cv2

        from agent.backend import OnnxRuntimeBackend
        from agent.factory import build_pair
        from agent.models import FACENET
        from engines.prepare import prepare_fr

        batch = np.random.default_rng(0).normal(size=(batch_size, 3, 160, 160)).astype(np.float32)
        if form == "cv2.dnn":
            from engines.facenet import facenet_pb_path

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
                dense = OnnxRuntimeBackend(prepared.dense, threads)
                run = dense.run
            else:
                pair = build_pair(prepared, "separate" if form == "dense+twin" else "trunk", threads)
                run = pair.embed
        ms = _time(run, batch, faces)
        q.put((ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))
    except Exception as e:  # reported by the parent
        q.put(e)


def _measure(form: str, batch: int, faces: int, recipe: str, threads: int | None, cache: Path | None):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(form, batch, faces, recipe, threads, str(cache) if cache else None, q))
    p.start()
    res = q.get()
    p.join()
    if isinstance(res, Exception):
        raise RuntimeError(f"bench {form} batch {batch} failed: {res}") from res
    return res


def bench_score(recipe: str, batches: list[int], faces: int, threads: int | None, cache: Path | None,
                out: TextIO) -> list[dict]:
    from agent.models import FACENET
    from engines.prepare import prepare_fr

    prepare_fr(FACENET, recipe, cache)  # once, outside the timed processes
    out.write(f"# bestshot bench score: recipe {recipe}, threads {threads or 'all'}, "
              f"{platform.processor() or platform.machine()}, {mp.cpu_count()} cores\n")
    ref_ms, ref_rss = _measure("cv2.dnn", 1, max(8, faces // 4), recipe, threads, cache)
    out.write(f"reference cv2.dnn (original TF graph, batch 1): {ref_ms:.2f} ms/face, "
              f"{1000 / ref_ms:.1f} faces/s, peak RSS {ref_rss:.0f} MB\n")
    out.write(f"{'form':12s} {'batch':>5s} {'ms/face':>8s} {'faces/s':>8s} {'x cv2.dnn':>9s} {'peak MB':>8s}\n")
    rows = []
    for batch in batches:
        for form in FORMS:
            ms, rss = _measure(form, batch, max(faces, batch), recipe, threads, cache)
            rows.append({"form": form, "batch": batch, "ms_per_face": ms, "peak_rss_mb": rss,
                         "speed_vs_cv2dnn": ref_ms / ms})
            out.write(f"{form:12s} {batch:5d} {ms:8.2f} {1000 / ms:8.1f} {ref_ms / ms:9.2f} {rss:8.0f}\n")
            out.flush()
    for batch in batches:
        by = {r["form"]: r["ms_per_face"] for r in rows if r["batch"] == batch}
        sep, trunk = by["dense+twin"] / by["dense"] - 1, by["trunk"] / by["dense"] - 1
        out.write(f"batch {batch}: cost over dense: separate twin +{sep:.0%}, shared trunk +{trunk:.0%}\n")
    return rows
