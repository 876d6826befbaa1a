"""Reliability on loopback, bounded in time: a camera server killed and restarted, garbage and truncated
inputs, a subscriber that stops reading. The agent runs as its own process; we watch it through its
metrics endpoint, its log and a real subscriber."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families


class AgentProcess:
    def __init__(self, tmp: Path, cameras: list[dict], **sections):
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        cfg = {"cameras": cameras, "publisher": {"endpoint": self.endpoint},
               "metrics": {"listen": f"127.0.0.1:{self.port}"}, "scoring": {"budget": 15}, **sections}
        self.cfg = tmp / "bestshot.yaml"
        self.cfg.write_text(yaml.safe_dump(cfg))
        self.log = tmp / "agent.log"
        self.trace = tmp / "trace.jsonl"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.cfg),
                                          "--trace", str(self.trace)], stderr=err, stdout=subprocess.DEVNULL)
        self.wait(lambda: self.metrics() is not None, 120, "the metrics endpoint")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> dict | None:
        status, text = self.get("/metrics")
        if status != 200:
            return None
        out: dict = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels) -> float:
        m = self.metrics() or {}
        return sum(v for (n, lab), v in m.items()
                   if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"agent died: {self.log.read_text()[-2000:]}"
            if cond():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; log tail: {self.log.read_text()[-1500:]}")

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.proc.kill()


def looping(clip: Path, cam: str, fps: float = 10) -> dict:
    return {"id": cam, "url": str(clip), "source": {"loop": True, "max_fps": fps}}


def test_camera_server_killed_and_restarted(rtsp_server, shared_dir, tmp_path):
    server = rtsp_server(loop=True)
    other = looping(shared_dir / "data/video/inspireface_810_1684206192.mp4", "other")
    cams = [{"id": "rtsp", "url": server.url, "source": {"backoff_initial_s": 0.2, "backoff_max_s": 1.0}}, other]
    agent = AgentProcess(tmp_path, cams)
    try:
        agent.wait(lambda: agent.value("bestshot_frames_decoded_total", camera="rtsp") > 30, 90, "rtsp frames")
        reconnects = 0
        for _ in range(2):  # kill the server mid-stream, twice
            server.kill()
            agent.wait(lambda: agent.value("bestshot_camera_up", camera="rtsp") == 0, 30, "rtsp marked down")
            # /healthz: still healthy (the other camera is up), and says this one is down and why
            status, body = agent.get("/healthz")
            health = json.loads(body)
            assert status == 200 and health["status"] == "ok", body
            assert health["cameras"]["rtsp"]["up"] is False and health["cameras"]["rtsp"]["last_error"], body
            assert health["cameras"]["other"]["up"] is True, body
            other_before = agent.value("bestshot_frames_decoded_total", camera="other")
            time.sleep(2)
            # the other camera is unaffected while this one is down
            assert agent.value("bestshot_frames_decoded_total", camera="other") > other_before
            server.start()
            decoded = agent.value("bestshot_frames_decoded_total", camera="rtsp")
            agent.wait(lambda d=decoded: agent.value("bestshot_frames_decoded_total", camera="rtsp") > d + 30, 60,
                       "rtsp frames after the restart")
            reconnects = agent.value("bestshot_camera_reconnects_total", camera="rtsp")
        assert reconnects >= 2
        health = json.loads(agent.get("/healthz")[1])
        assert health["cameras"]["rtsp"]["up"] is True and health["cameras"]["rtsp"]["reconnects"] >= 2, health
        # each drop is logged against this camera, with the url and the backoff
        drops = [ln for ln in agent.log.read_text().splitlines()
                 if f"camera rtsp: {server.url}:" in ln and "retry in" in ln]
        assert len(drops) >= 2, agent.log.read_text()[-2000:]
        print(f"reliability: RTSP server killed twice: {reconnects:.0f} reconnects, {len(drops)} logged drops")
    finally:
        assert agent.terminate() == 0


def test_garbage_and_truncated_inputs_mark_the_camera_down(shared_dir, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    clip = shared_dir / "data/video/short_hamilton_clip.mp4"
    truncated = tmp_path / "truncated.mp4"
    # moov atom at the end of this file: a cut copy cannot even be opened
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    cams = [{"id": "garbage", "url": str(garbage)}, {"id": "truncated", "url": str(truncated)},
            {"id": "noise", "url": f"tcp://127.0.0.1:{free_port()}?listen=0",
             "source": {"connect_timeout_s": 1, "read_timeout_s": 1, "backoff_max_s": 1}},
            looping(shared_dir / "data/video/inspireface_810_1684206192.mp4", "good")]
    agent = AgentProcess(tmp_path, cams)
    try:
        agent.wait(lambda: agent.value("bestshot_frames_decoded_total", camera="good") > 30, 90, "good frames")
        agent.wait(lambda: "garbage.mp4" in agent.log.read_text() and "truncated.mp4" in agent.log.read_text(), 30,
                   "error lines for the broken files")
        log = agent.log.read_text()
        for cam in ("garbage", "truncated"):
            line = next(ln for ln in log.splitlines() if f"camera {cam}:" in ln and "ERROR" in ln)
            assert f"{cam}.mp4" in line  # names the file and the cause
        assert "camera noise:" in log and "retry in" in log
        decoded = agent.value("bestshot_frames_decoded_total", camera="good")
        time.sleep(2)
        assert agent.value("bestshot_frames_decoded_total", camera="good") > decoded  # agent alive, good camera on
        status, body = agent.get("/healthz")
        health = json.loads(body)
        assert status == 200 and health["cameras"]["good"]["up"]
        for cam in ("garbage", "truncated"):
            assert not health["cameras"][cam]["up"] and health["cameras"][cam]["last_error"]
        print(f"reliability: garbage/truncated/dead inputs: healthz {status} {health}")
    finally:
        assert agent.terminate() == 0


def test_stalled_subscriber_memory_bounded_pipeline_not_stalled(shared_dir, tmp_path):
    clip = shared_dir / "data/video/inspireface_810_1684206192.mp4"
    cam = looping(clip, "busy", fps=15)
    cam["selection"] = {"update_every_s": 0.1}  # many messages: an update per track every 0.1 s of video
    agent = AgentProcess(tmp_path, [cam], publisher={"endpoint": f"tcp://127.0.0.1:{free_port()}", "sndhwm": 5},
                         scoring={"budget": None, "max_batch": 4})
    # max_batch 4: ONNX Runtime's arena grows once to the largest batch it has seen (up to ~120 MB more at batch 32
    # on a loaded machine, where the queue backs up); this test is about the publisher path, so keep that fixed.
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(yaml.safe_load(agent.cfg.read_text())["publisher"]["endpoint"])
    try:
        agent.wait(lambda: agent.value("bestshot_shots_published_total") > 10, 120, "shots published")
        time.sleep(5)  # settle: the first batches' buffers (decoder, arena) are not what this measures
        rss0, frames0, shots0 = agent.rss_mb(), agent.value("bestshot_frames_decoded_total"), \
            agent.value("bestshot_shots_published_total")
        time.sleep(20)  # the subscriber reads nothing meanwhile
        rss1, frames1, shots1 = agent.rss_mb(), agent.value("bestshot_frames_decoded_total"), \
            agent.value("bestshot_shots_published_total")
        assert frames1 - frames0 > 100, "the pipeline stalled behind the subscriber"
        assert shots1 - shots0 > 20
        assert rss1 - rss0 < 40, f"memory grew by {rss1 - rss0:.1f} MB"
        got, deadline = 0, time.monotonic() + 10
        # the subscriber still works when it reads again (bounded: the agent never stops publishing updates)
        while got < 20 and time.monotonic() < deadline and sub.poll(200):
            sub.recv_multipart()
            got += 1
        assert got >= 1
        print(f"reliability: stalled subscriber: {shots1 - shots0:.0f} shots and {frames1 - frames0:.0f} frames in "
              f"20 s, RSS {rss0:.0f} -> {rss1:.0f} MB")
    finally:
        sub.close(0)
        ctx.term()
        assert agent.terminate() == 0


@pytest.mark.parametrize("mode", ["push"])
def test_sigterm_under_load_publishes_every_scored_track(shared_dir, tmp_path, mode):
    """Two busy cameras; SIGTERM mid-stream: every track with a scored candidate reaches a PULL consumer."""
    crowd = shared_dir / "data/video/facenet_pytorch_video.mp4"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(endpoint)
    cams = [looping(crowd, "a", fps=25), looping(shared_dir / "data/video/short_hamilton_clip.mp4", "b", fps=30)]
    agent = AgentProcess(tmp_path, cams, publisher={"endpoint": endpoint, "mode": mode})
    got = []
    try:
        agent.wait(lambda: agent.value("bestshot_candidates_scored_total") > 20, 120, "scoring under load")
        assert agent.terminate() == 0
        while pull.poll(2000):
            got.append(json.loads(pull.recv_multipart()[1]))
    finally:
        pull.close(0)
        ctx.term()
    recs = [json.loads(ln) for ln in agent.trace.read_text().splitlines()]
    scored = {(r["camera"], r["track_id"]) for r in recs if r["event"] == "scored"}
    received = {(m["camera"], m["track_id"]) for m in got if m["status"] != "update"}
    assert scored and received == scored, f"lost {len(scored - received)} of {len(scored)} tracks"
    assert "SIGTERM: stopping the sources" in agent.log.read_text()
    print(f"reliability: SIGTERM under load: {len(scored)} scored tracks, {len(received)} received, 0 lost")
