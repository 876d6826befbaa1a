"""`bestshot bench cameras`: how many cameras one box holds in real time.

N file sources play at their frame rate, as live cameras deliver them (a frame the agent cannot take in time is
dropped and counted), through the real agent publishing on ZeroMQ. N grows until a run drops frames; each run is a
fresh process (its own peak RSS). The reference, in the same run, is each clip unpaced with unlimited scoring
(every frame processed): the share of tracks whose published shot differs from it is reported.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TextIO

STAGES = ("decode", "detect", "track", "align", "score", "publish")
SAME_SHOTS = 0.10  # share of tracks whose published shot may differ from the unlimited reference


@dataclass(frozen=True)
class CameraBench:
    """What every run shares: clips (camera i plays clips[i % len]), frame rate, media seconds and settings."""

    clips: tuple[str, ...]
    fps: float = 15.0
    duration_s: float = 10.0
    detect_every: int = 1
    detect_input: int = 640
    budget: float | None = 30.0
    threads: int | None = None
    detector: str = "centerface"
    detector_model: str | None = None  # the detector's ONNX file (None: CenterFace or RetinaFace, from their wheels)
    precision: str = "fp32"  # scoring.precision

    def config(self, n: int, paced: bool) -> dict:
        """The agent's configuration for n cameras (paced: live-like; else decoded as fast as it goes)."""
        source = {"realtime": paced, "drop_when_full": paced, "loop": True, "duration_s": self.duration_s,
                  "max_fps": self.fps}
        cams = [{"id": f"cam{i}", "url": self.clips[i % len(self.clips)], "source": source,
                 "detector": {"kind": self.detector, "path": self.detector_model, "input_size": self.detect_input},
                 "detect_every": self.detect_every} for i in range(n)]
        return {"cameras": cams, "scoring": {"budget": self.budget if paced else None, "threads": self.threads,
                                             "precision": self.precision},
                "publisher": {"endpoint": "tcp://127.0.0.1:*"}, "metrics": {"listen": None}}


def _run(bench: CameraBench, n: int, paced: bool) -> dict:
    """One agent run in this process: its figures and the final published frame of every (camera, track)."""
    from agent.service.config import parse_config
    from agent.service.process import Agent

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        agent = Agent(parse_config(bench.config(n, paced)), trace)
        cpu0 = os.times()
        summary = agent.run()
        cpu1 = os.times()
        shots, scored = {}, {}
        for line in trace.read_text().splitlines():
            rec = json.loads(line)
            key = f"{rec.get('camera')}/{rec.get('track_id')}"
            if rec["event"] == "published":
                shots[key] = rec["frame_index"]
            elif rec["event"] == "scored":
                scored.setdefault(key, {})[rec["frame_index"]] = rec["quality"]
    stats = [w.source.stats for w in [*agent.pipeline.finished, *agent.pipeline.workers.values()]]
    times, frames = agent.pipeline.times, max(1, summary.frames)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    lat, flush = agent.pipeline.end_latency_s, agent.pipeline.flush_latency_s
    return {
        "cameras": n, "paced": paced, "seconds": summary.seconds, "frames": summary.frames,
        "frames_offered": sum(s.decoded - s.dropped_fps for s in stats),
        "dropped": sum(s.dropped_queue + s.dropped_late for s in stats),
        "stage_ms_per_frame": {k: times.ms[k] / frames for k in STAGES if k in times.ms},
        "stage_core_share": {k: times.ms[k] / 1000.0 / summary.seconds for k in STAGES if k in times.ms},
        "cpu_cores": cpu / summary.seconds, "faces_detected": summary.detections, "faces_scored": summary.scored,
        "shots": summary.published, "end_to_message_ms_median": statistics.median(lat) * 1000 if lat else None,
        "flush_to_message_ms_median": statistics.median(flush) * 1000 if flush else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "tracks": shots,
        "qualities": scored,
    }


def _child(bench: CameraBench, n: int, paced: bool, q: mp.Queue) -> None:
    try:
        q.put(_run(bench, n, paced))
    except Exception as e:  # reported by the parent
        q.put(e)


def run_once(bench: CameraBench, n: int, paced: bool) -> dict:
    """`_run` in a fresh process, so that its peak RSS and CPU are its own."""
    from agent.cli.bench import in_fresh_process

    return in_fresh_process(_child, (bench, n, paced), f"bench cameras: {n} camera(s)")


def shots_changed(run: dict, refs: dict[str, dict], clips: tuple[str, ...]) -> tuple[int, int, float]:
    """(tracks whose final published frame differs from the reference of their clip or is missing, reference
    tracks compared, the most quality a changed shot lost), over every camera of `run`; camera i is matched to
    `refs[clips[i % len]]` by track id. Quality lost is on the reference's own scores: its shot's quality minus
    its quality of the frame the run published (all of it for a track the run did not publish)."""
    changed = total = 0
    lost = 0.0
    for i in range(run["cameras"]):
        ref = refs[clips[i % len(clips)]]
        for key, frame in ref["tracks"].items():
            total += 1
            got = run["tracks"].get(f"cam{i}/{key.split('/', 1)[1]}")
            if got != frame:
                changed += 1
                quality = ref["qualities"][key]
                if got is None or got in quality:  # a frame the reference never scored (another track) is skipped
                    lost = max(lost, quality[frame] - quality.get(got, 0.0))
    return changed, total, lost


def _line(r: dict) -> str:
    stages = " / ".join(f"{r['stage_ms_per_frame'].get(k, 0.0):.1f}" for k in STAGES)
    lat, flush = (r[k] if r[k] is not None else float("nan") for k in ("end_to_message_ms_median",
                                                                        "flush_to_message_ms_median"))
    return (f"{r['cameras']:3d} {r['frames']:7d} {r['frames_offered']:7d} {r['dropped']:7d} "
            f"{r['frames'] / r['seconds']:7.1f} {r['cpu_cores']:5.2f} {r['faces_scored']:6d} "
            f"{lat:7.0f} {flush:8.0f} {r['peak_rss_mb']:6.0f} "
            f"{r.get('changed_share', float('nan')):7.1%} {r.get('quality_lost', float('nan')):6.3f}  {stages}")


def bench_cameras(bench: CameraBench, counts: list[int], out: TextIO) -> dict:
    """Reference runs (each clip unpaced, unlimited scoring), then N = counts in order until a run drops frames."""
    load = os.getloadavg()
    out.write(f"# bestshot bench cameras: {', '.join(bench.clips)}\n# {platform.processor() or platform.machine()}, "
              f"{mp.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {bench.fps:g} fps, "
              f"{bench.duration_s:g} s of media per camera, {bench.detector} detection on every "
              f"{bench.detect_every}. frame at {bench.detect_input} px, scoring budget "
              f"{bench.budget or 'unlimited'} faces/s, scoring {bench.precision}, threads {bench.threads or 'all'}\n")
    refs = {}
    for clip in dict.fromkeys(bench.clips):
        refs[clip] = run_once(replace(bench, clips=(clip,)), 1, paced=False)
        r = refs[clip]
        out.write(f"reference (unpaced, unlimited scoring) {Path(clip).name}: {r['frames']} frames in "
                  f"{r['seconds']:.1f} s = {r['frames'] / r['seconds'] / bench.fps:.2f}x real time at "
                  f"{bench.fps:g} fps, {r['faces_scored']} faces scored, {len(r['tracks'])} tracks, track end -> "
                  f"message median {r['end_to_message_ms_median'] or float('nan'):.0f} ms\n")
    # e2m_ms: tracks the tracker ended (unseen for max_lost_s); flush_ms: those open when the media ran out
    # lost: the most quality a changed shot lost, on the reference's scores (quality: P(match at FMR 1e-3))
    out.write("  N  frames offered dropped  fr/s  cores scored e2m_ms flush_ms  rss_MB changed   lost  ms/frame "
              "decode / detect / track / align / score / publish\n")
    runs, best = [], 0
    for n in counts:
        r = run_once(bench, n, paced=True)
        changed, total, lost = shots_changed(r, refs, bench.clips)
        r["shots_changed"], r["tracks_compared"], r["quality_lost"] = changed, total, lost
        r["changed_share"] = changed / total if total else 0.0
        runs.append(r)
        out.write(_line(r) + "\n")
        out.flush()
        if r["dropped"]:
            break
        best = n
    # the operator's second question: how many cameras before the shots change (a budget that runs short)
    same = max((r["cameras"] for r in runs if not r["dropped"] and r["changed_share"] <= SAME_SHOTS), default=0)
    out.write(f"largest camera count without a dropped frame: {best} at {bench.fps:g} fps; with the shots of "
              f"unlimited resources on {1 - SAME_SHOTS:.0%} of tracks too: {same}\n")
    for r in [*runs, *refs.values()]:
        r["tracks"] = len(r["tracks"])
        del r["qualities"]
    return {"bench": asdict(bench), "load_average": load, "references": refs, "runs": runs, "max_cameras": best,
            "max_cameras_same_shots": same}
