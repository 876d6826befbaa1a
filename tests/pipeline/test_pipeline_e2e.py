"""End to end, real parts: shared videos (file and RTSP) and upstream tracks through the whole pipeline to a real
ZeroMQ subscriber."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from ports import free_port

from agent.cli.subscribe import subscribe
from agent.common.fr_spec import FACENET
from agent.quality.ers import load_ers
from agent.quality.selection import WEIGHTS
from engines.prepare import prepare_fr


class Receiver:
    """A real subscriber on its own thread, collecting every message it gets."""

    def __init__(self, endpoint: str, out: Path, mode: str = "sub"):
        self.lines: list[dict] = []
        self.out = out
        self.thread = threading.Thread(
            target=subscribe, args=(endpoint, out, None, 300.0),
            kwargs={"write_line": lambda line: self.lines.append(json.loads(line)), "mode": mode}, daemon=True)
        self.thread.start()
        time.sleep(0.3)

    def wait(self, trace: Path, timeout: float = 30) -> list[dict]:
        """The messages, once as many arrived as the trace says were published (or after `timeout`)."""
        expected = len(read_trace(trace)[1])
        deadline = time.monotonic() + timeout
        while len(self.lines) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # anything beyond the expected would be a duplicate: give it a chance to show
        return list(self.lines)


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=timeout)


def read_trace(path: Path) -> tuple[dict, list[dict]]:
    scored: dict[tuple, list[dict]] = defaultdict(list)
    published = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        key = (rec["camera"], rec["track_id"])
        if rec["event"] == "scored":
            scored[key].append(rec)
        elif rec["event"] == "published":
            published.append(rec)
    return scored, published


def check_messages(msgs: list[dict], trace: Path, min_quality: float = 0.0) -> None:
    """One message per track; every file decodes; the shot is the best-quality scored frame of its track."""
    scored, published = read_trace(trace)
    assert msgs, "no message received"
    keys = [(m["camera"], m["track_id"]) for m in msgs]
    assert len(keys) == len(set(keys)), "more than one message for a track"
    assert len(msgs) == len(published), "the subscriber lost messages"
    ers = load_ers(prepare_fr(FACENET))  # the built-in one the agent made (or a calibration)
    for m in msgs:
        # quality is the selection score, a probability; the status follows min_quality (0.0 here: always "best")
        assert 0.0 <= m["quality"] <= 1.0
        assert m["status"] == ("best" if m["quality"] >= min_quality else "unrecognisable")
        assert abs(m["prefiqs"] - (1.0 - m["drift"] / 2.0)) < 1e-6
        assert set(m["extra"]["cues"]) == set(WEIGHTS) and abs(m["extra"]["cues"]["prefiqs"] - m["prefiqs"]) < 1e-4
        assert abs(m["extra"]["cues"]["detector"] - m["det_score"]) < 1e-4
        face = cv2.imread(m["files"]["face"])
        context = cv2.imread(m["files"]["context"])
        assert face is not None and face.shape[:2] == (160, 160)
        assert context is not None and context.size > 0
        emb = np.fromfile(m["files"]["embedding"], "<f4")
        assert emb.shape == (512,) and abs(np.linalg.norm(emb) - 1) < 1e-3
        cands = scored[(m["camera"], m["track_id"])]
        best = max(cands, key=lambda c: c["quality"])
        assert m["frame_index"] == best["frame_index"] and abs(m["quality"] - best["quality"]) < 1e-6
        assert m["frames_scored"] == len(cands) <= m["frames_seen"]
        assert m["timestamps"]["first_seen"] <= m["timestamps"]["best"] <= m["timestamps"]["last_seen"]
        template = np.array(m["extra"]["template"])  # the track's template over its best frames
        assert template.shape == (512,) and abs(np.linalg.norm(template) - 1) < 1e-3
        assert 1 <= m["extra"]["template_frames"] <= min(8, len(cands))
        # ERS without any calibration run: the built-in one, made at start from the packages' images
        assert abs(m["extra"]["ers"] - m["extra"]["cues"]["ers"]) < 1e-3
        assert m["extra"]["recognisable"] == (m["extra"]["cues"]["ers"] >= ers.threshold)


def test_file_source_end_to_end(shared_dir, tmp_path):
    clip = shared_dir / "data/video/short_hamilton_clip.mp4"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    rx = Receiver(endpoint, tmp_path / "out")
    r = run_cli("run", "--source", str(clip), "--publish", endpoint, "--trace", str(tmp_path / "trace.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    msgs = rx.wait(tmp_path / "trace.jsonl")
    check_messages(msgs, tmp_path / "trace.jsonl")
    assert "camera short_hamilton_clip: ended after 275 frames" in r.stderr
    # named after the file, not `demo`; the build and the model that produced each shot are in its metadata
    assert {m["camera"] for m in msgs} == {"short_hamilton_clip"}
    assert {m["agent_version"] for m in msgs} == {version("bestshot-agent")}
    assert all(m["model_id"].startswith("facenet:") for m in msgs)
    # 1 to 7 faces per frame over three shots: a handful of tracks, not hundreds
    assert 3 <= len(msgs) <= 40


def test_config_file_1080p_with_budget_and_topk(shared_dir, tmp_path):
    """The 1080p crowd clip, detection on a downscaled frame, a scoring budget and top-3 shots per track."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = {
        "cameras": [{"id": "arcade", "url": str(shared_dir / "data/video/facenet_pytorch_video.mp4")}],
        "defaults": {"detector": {"input_size": 960}, "selection": {"top_k": 3, "min_face": 20, "min_quality": 0.5}},
        "scoring": {"budget": 10},  # faces a second: well under what this clip offers (about 430 pass the gates)
        "publisher": {"endpoint": endpoint},
        "metrics": {"listen": None},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rx = Receiver(endpoint, tmp_path / "out")
    r = run_cli("run", "--config", str(path), "--trace", str(tmp_path / "trace.jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    msgs = rx.wait(tmp_path / "trace.jsonl")
    check_messages(msgs, tmp_path / "trace.jsonl", min_quality=0.5)
    assert len(msgs) >= 4  # 4 to 10 faces per frame
    # the budget held: at most 10 a second over the run, plus the burst and each track's pending face at its end
    done = re.search(r"done: \d+ frames, \d+ faces detected, (\d+) scored \((\d+) deferred by the budget\), "
                     r"(\d+) shots published \(\d+ dropped\) in ([\d.]+) s", r.stderr)
    assert done, r.stderr[-3000:]
    scored, deferred, published, seconds = int(done[1]), int(done[2]), int(done[3]), float(done[4])
    assert deferred > 0 and scored <= 10 * (seconds + 0.1) + 10 + published, done[0]
    assert scored == sum(map(len, read_trace(tmp_path / "trace.jsonl")[0].values()))
    for m in msgs:
        top = m["extra"]["top_k"]
        assert 1 <= len(top) <= 3 and top[0]["frame_index"] == m["frame_index"]
        assert [t["quality"] for t in top] == sorted((t["quality"] for t in top), reverse=True)


def test_rtsp_source_end_to_end_and_sigterm_flush(rtsp_server, tmp_path):
    """A real RTSP server on loopback; SIGTERM mid-stream flushes every open track and exits 0."""
    server = rtsp_server()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    rx = Receiver(endpoint, tmp_path / "out")
    trace = tmp_path / "trace.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--source", server.url, "--publish", endpoint,
                             "--trace", str(trace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait until faces are being scored from the stream
            if trace.exists() and sum('"scored"' in ln for ln in trace.read_text().splitlines()) >= 10:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no face scored from the RTSP stream within 90 s")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: stopping" in err
    msgs = rx.wait(trace)
    check_messages(msgs, trace)
    scored, _ = read_trace(trace)
    assert {(m["camera"], m["track_id"]) for m in msgs} == set(scored)  # every scored track was published


def test_upstream_tracks_end_to_end(shared_dir, tmp_path):
    """Frames and tracks from an upstream tracker over ZeroMQ: our detector and tracker are skipped."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from upstream_sender import send, video_frames

    from agent.pipeline.detect import DetectorSpec, make_detector
    from agent.pipeline.track import Tracker
    from agent.service.config import parse_config
    from agent.service.process import Agent

    det = make_detector(DetectorSpec())
    tracker = Tracker()
    clip = shared_dir / "data/video/inspireface_810_1684206192.mp4"

    def tracks(frame):  # an "upstream" tracker: ours, ids offset to tell them apart
        update = tracker.update(det.detect(frame.image), frame.pts)
        return [{"id": 1000 + t.track_id, "box": t.det.bbox.tolist(), "score": float(t.det.score),
                 "landmarks": t.det.landmarks.tolist()} for t in update.active]

    # computed before sending: detection inside the sender on a loaded box can leave gaps between frames longer
    # than the agent's max_lost_s, which (rightly) ends a track that then starts again under the same id
    upstream = {f.index: tracks(f) for f in video_frames(clip, "selfie", 120)}

    up = f"tcp://127.0.0.1:{free_port()}"
    out = f"tcp://127.0.0.1:{free_port()}"
    cfg = parse_config({"cameras": [{"id": "upstream", "upstream": {"endpoint": up}}],
                        "publisher": {"endpoint": out}, "metrics": {"listen": None}})
    agent = Agent(cfg, trace=tmp_path / "trace.jsonl")
    rx = Receiver(out, tmp_path / "out")
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    send(up, video_frames(clip, "selfie", 120), lambda f: upstream[f.index], bind=True, subscribers=1)
    # with no more frames, every track ends on its own (wall clock past max_lost_s) and is published before stop()
    trace = tmp_path / "trace.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
            trace.exists() and (done := read_trace(trace))[0] and set(done[0]) == {
                (p["camera"], p["track_id"]) for p in done[1]}):
        time.sleep(0.2)
    scored, published = read_trace(trace)
    assert scored and set(scored) == {(p["camera"], p["track_id"]) for p in published}, "tracks did not end"
    agent.stop()
    runner.join(60)
    assert not runner.is_alive(), "the agent did not stop"
    msgs = rx.wait(tmp_path / "trace.jsonl")
    check_messages(msgs, tmp_path / "trace.jsonl")
    assert {m["camera"] for m in msgs} == {"selfie"}
    assert all(m["track_id"] >= 1000 for m in msgs)
