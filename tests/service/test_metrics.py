"""Prometheus /metrics and /healthz over real HTTP on 127.0.0.1: the collector reads the stages' own counters at scrape
time (a small object graph with the pipeline's attribute names, then a real Pipeline on the shared clip)."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib.metadata import version

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.pipeline.runner import StageTimes
from agent.pipeline.select import Gate, SelectionConfig, TokenBucket
from agent.pipeline.sources.upstream import UpstreamOptions, UpstreamSource
from agent.pipeline.sources.video import SourceOptions, SourceStats
from agent.service.metrics import Liveness, Metrics, serve

pytestmark = pytest.mark.timeout(120)


@dataclass
class FakeSource:
    stats: SourceStats


@dataclass
class FakeCam:
    id: str


@dataclass
class FakeWorker:
    cam: FakeCam
    source: FakeSource | UpstreamSource
    frames: int = 0
    detections: int = 0
    alive: bool = True
    error: str | None = None
    gates: dict[str, Gate] = field(default_factory=dict)

    def is_alive(self) -> bool:
        return self.alive


@dataclass
class FakeScorer:
    model_id: str = "facenet:e12520326353:2:4/Bottleneck"


@dataclass
class FakePipeline:
    workers: dict[str, FakeWorker]
    finished: list[FakeWorker] = field(default_factory=list)
    retiring: list[FakeWorker] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    scored: int = 0
    published: int = 0
    heartbeat: float = field(default_factory=time.monotonic)
    queue: queue.Queue = field(default_factory=queue.Queue)
    times: StageTimes = field(default_factory=StageTimes)
    scorer: FakeScorer = field(default_factory=FakeScorer)


@dataclass
class FakePublisher:
    published: int = 0
    dropped: int = 0


def gate(camera: str, opened: int, closed: int, gated: int = 0, deferred: int = 0) -> Gate:
    g = Gate(camera, SelectionConfig(), TokenBucket(None))
    g.opened, g.closed, g.gated, g.deferred = opened, closed, gated, deferred
    return g


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def graph():
    door = FakeWorker(FakeCam("door"), FakeSource(SourceStats(decoded=100, dropped_queue=7, dropped_fps=30,
                                                               reconnects=2, up=True)),
                      frames=83, detections=95, gates={"door": gate("door", 5, 3, gated=11, deferred=4)})
    # the worker "door" had before a configuration reload replaced it: its counts stay in the camera's totals
    door_before = FakeWorker(FakeCam("door"), FakeSource(SourceStats(decoded=20, dropped_queue=1)), frames=20,
                             detections=5, alive=False, gates={"door": gate("door", 2, 2)})
    yard = FakeWorker(FakeCam("yard"), FakeSource(SourceStats(decoded=10, reconnects=6, up=False,
                                                               last_error="timed out")), frames=10)
    upstream = UpstreamSource(UpstreamOptions("tcp://127.0.0.1:1"))  # never started: counters only
    upstream.received, upstream.malformed = 50, 2
    ds = FakeWorker(FakeCam("ds"), upstream, frames=48, detections=60,
                    gates={"ds-1": gate("ds-1", 4, 4), "ds-2": gate("ds-2", 1, 0)})
    ended = FakeWorker(FakeCam("clip"), FakeSource(SourceStats(decoded=275)), frames=275, detections=300, alive=False,
                       gates={"clip": gate("clip", 9, 9)})
    pipeline = FakePipeline({"door": door, "yard": yard, "ds": ds}, [ended, door_before], scored=77, published=12)
    return pipeline, FakePublisher(published=24, dropped=1)  # two outputs took each of the 12 shots


@dataclass
class Clock:
    """The time Liveness reads: moved by the test, so stalls are exact and no test waits on the wall clock."""

    t: float = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def server(graph):
    pipeline, publisher = graph
    metrics = Metrics().bind(pipeline, publisher)
    clock = Clock()
    pipeline.heartbeat = clock()
    liveness = Liveness(pipeline, stall_s=20, clock=clock)
    srv = serve("127.0.0.1:0", metrics.registry, liveness.health)
    yield srv.server_address[1], pipeline, publisher, liveness
    srv.shutdown()
    srv.server_close()


def test_metrics_reflect_the_stages_counters(server):
    port, pipeline, publisher, _ = server
    pipeline.times.add("detect", 0.02)
    pipeline.times.add("score", 0.3, count=16)
    m = scrape(port)
    cam = (("camera", "door"),)
    assert m["bestshot_frames_decoded_total", cam] == 120
    assert m["bestshot_frames_dropped_total", (("camera", "door"), ("reason", "queue"))] == 8
    assert m["bestshot_frames_dropped_total", (("camera", "door"), ("reason", "fps"))] == 30
    assert m["bestshot_detections_total", cam] == 100
    assert m["bestshot_camera_reconnects_total", cam] == 2
    assert m["bestshot_camera_up", cam] == 1 and m["bestshot_camera_up", (("camera", "yard"),)] == 0
    assert m["bestshot_tracks_opened_total", cam] == 7 and m["bestshot_tracks_closed_total", cam] == 5
    assert m["bestshot_faces_gated_total", cam] == 11 and m["bestshot_faces_deferred_total", cam] == 4
    # an upstream input: well-formed messages as frames, malformed ones as drops, tracks per upstream camera
    assert m["bestshot_frames_decoded_total", (("camera", "ds"),)] == 48
    assert m["bestshot_frames_dropped_total", (("camera", "ds"), ("reason", "malformed"))] == 2
    assert m["bestshot_tracks_opened_total", (("camera", "ds-2"),)] == 1
    # a camera whose file ended keeps its counters
    assert m["bestshot_frames_decoded_total", (("camera", "clip"),)] == 275
    assert ("bestshot_camera_up", (("camera", "clip"),)) not in m  # up/down only for running cameras
    assert m["bestshot_candidates_scored_total", ()] == 77
    assert m["bestshot_shots_published_total", ()] == 12 and m["bestshot_shots_dropped_total", ()] == 1
    assert m["bestshot_scoring_queue", ()] == 0
    assert m["bestshot_stage_seconds_count", (("stage", "detect"),)] == 1
    assert m["bestshot_stage_seconds_bucket", (("le", "0.01"), ("stage", "detect"))] == 0
    assert m["bestshot_stage_seconds_bucket", (("le", "0.025"), ("stage", "detect"))] == 1
    assert m["bestshot_stage_seconds_sum", (("stage", "score"),)] == pytest.approx(0.3)
    assert m["bestshot_stage_seconds_count", (("stage", "publish"),)] == 0  # every stage is there from the start
    assert m["process_resident_memory_bytes", ()] > 0
    # which build and which scoring model produced the shots (the installed version, not a constant in the code)
    build = [labels for (name, labels), v in m.items() if name == "bestshot_build_info" and v == 1]
    assert build == [(("model_id", "facenet:e12520326353:2:4/Bottleneck"), ("version", version("bestshot-agent")))]


def test_counters_are_read_at_scrape_time(server):
    port, pipeline, publisher, _ = server
    pipeline.workers["door"].source.stats.decoded = 480
    pipeline.workers["door"].gates["door"].closed = 5
    pipeline.scored, pipeline.published = 90, 20
    pipeline.workers.pop("yard")  # removed by a reload: its series go
    m = scrape(port)
    assert m["bestshot_frames_decoded_total", (("camera", "door"),)] == 500
    assert m["bestshot_tracks_closed_total", (("camera", "door"),)] == 7
    assert m["bestshot_candidates_scored_total", ()] == 90 and m["bestshot_shots_published_total", ()] == 20
    assert ("bestshot_camera_up", (("camera", "yard"),)) not in m


def test_healthz(server):
    port, pipeline, _, liveness = server
    code, body = healthz(port)
    assert code == 200 and body["status"] == "ok" and body["reasons"] == []
    assert body["cameras"]["door"] == {"up": True, "ended": False, "frames": 83, "reconnects": 2, "last_error": None}
    assert body["cameras"]["yard"]["up"] is False and body["cameras"]["yard"]["last_error"] == "timed out"
    assert body["cameras"]["clip"]["ended"] is True

    pipeline.heartbeat -= 60  # the scoring loop hangs
    code, body = healthz(port)
    assert code == 503 and body["status"] == "unhealthy"
    assert any(r.startswith("scoring loop stalled for 60 s") for r in body["reasons"])

    pipeline.heartbeat = liveness.clock()
    for w in pipeline.workers.values():  # every camera down (reconnecting): not stuck, but not healthy either
        w.alive = isinstance(w.source, FakeSource)
        if isinstance(w.source, FakeSource):
            w.source.stats.up = False
    code, body = healthz(port)
    assert code == 503 and body["reasons"] == ["no camera is up"]


def test_stuck_camera_worker(server):
    """Frames keep coming from the source but the worker takes none: stuck (the watchdog then stops pinging)."""
    port, pipeline, _, liveness = server
    door = pipeline.workers["door"]
    clock = liveness.clock
    assert liveness.problems() == []
    clock.t += 19  # within stall_s (20 s): not stuck yet
    pipeline.heartbeat = clock()  # the scoring loop is fine
    assert liveness.problems() == []
    clock.t += 2
    pipeline.heartbeat = clock()
    assert liveness.problems() == ["camera door: worker took no frame for 21 s while its source is up"]
    door.frames += 1
    assert liveness.problems() == []
    door.source.stats.up = False  # a camera that is down is not stuck: its source reconnects
    clock.t += 60
    pipeline.heartbeat = clock()
    assert liveness.problems() == []


def test_other_paths_and_busy_port(server):
    port, *_ = server
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
    assert e.value.code == 404
    with pytest.raises(OSError):
        serve(f"127.0.0.1:{port}", Metrics().registry, lambda: (True, {}))


def test_real_pipeline(shared_dir):
    """A real Pipeline (detector, tracker, gates, scorer) and Publisher on the shared clip, looping: the HTTP figures
    are the stages' own, while it runs and after the stop flushed every track."""
    from agent.common.fr_spec import FACENET
    from agent.pipeline.outputs.zeromq import Publisher, PublisherConfig
    from agent.pipeline.runner import CameraConfig, Pipeline
    from agent.pipeline.score import build_scorer

    clip = shared_dir / "data" / "video" / "short_hamilton_clip.mp4"
    scorer, _ = build_scorer(FACENET, max_batch=16)
    publisher = Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:*"))
    cam = CameraConfig(id="clip", url=str(clip), source=SourceOptions(loop=True), detect_every=3)
    pipeline = Pipeline([cam], FACENET, scorer, publisher.publish)
    metrics = Metrics().bind(pipeline, publisher)
    liveness = Liveness(pipeline, stall_s=10)
    srv = serve("127.0.0.1:0", metrics.registry, liveness.health)
    port = srv.server_address[1]
    runner = threading.Thread(target=pipeline.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while scrape(port).get(("bestshot_candidates_scored_total", ()), 0) < 1:
            assert time.monotonic() < deadline and runner.is_alive(), "nothing scored"
            time.sleep(0.2)
        m = scrape(port)
        assert m["bestshot_camera_up", (("camera", "clip"),)] == 1
        assert m["bestshot_tracks_opened_total", (("camera", "clip"),)] >= 1
        assert m["bestshot_stage_seconds_count", (("stage", "detect"),)] >= 1
        code, body = healthz(port)
        assert code == 200 and body["cameras"]["clip"]["up"], body
        assert liveness.problems() == []
    finally:
        pipeline.stop()
        runner.join(60)
    publisher.close()
    m = scrape(port)
    srv.shutdown()
    srv.server_close()
    [worker] = pipeline.finished
    gate_ = worker.gates["clip"]
    assert m["bestshot_frames_decoded_total", (("camera", "clip"),)] == worker.source.stats.decoded > 0
    assert m["bestshot_detections_total", (("camera", "clip"),)] == worker.detections > 0
    assert m["bestshot_tracks_opened_total", (("camera", "clip"),)] == gate_.opened
    assert m["bestshot_tracks_closed_total", (("camera", "clip"),)] == gate_.closed == gate_.opened  # all flushed
    assert m["bestshot_candidates_scored_total", ()] == pipeline.scored > 0
    assert m["bestshot_shots_published_total", ()] == publisher.published == pipeline.published > 0
    assert m["bestshot_build_info", (("model_id", scorer.model_id), ("version", version("bestshot-agent")))] == 1
    assert m["bestshot_stage_seconds_count", (("stage", "publish"),)] == pipeline.times.n["publish"]
    assert m["bestshot_stage_seconds_count", (("stage", "decode"),)] == pipeline.times.n["decode"] == worker.frames
    # detect_every=3: the worker's frames 0, 3, 6, ... are detected
    assert m["bestshot_stage_seconds_count", (("stage", "detect"),)] == pipeline.times.n["detect"] == -(
        -worker.frames // 3)
    assert ("bestshot_camera_up", (("camera", "clip"),)) not in m  # ended


def test_idle_clients_cannot_exhaust_the_listener():
    """129 idle connections used up a 128-descriptor limit and aborted the process: now at most `max_connections`
    are served at once (more are closed at once) and an idle one is closed after the request timeout."""
    import socket

    srv = serve("127.0.0.1:0", Metrics().registry, lambda: (True, {}), max_connections=4, request_timeout_s=1.0)
    port = srv.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        time.sleep(0.3)  # the server has taken every connection it will
        serving = sum("process_request_thread" in th.name for th in threading.enumerate())
        assert serving <= 4
        closed = 0
        for s in idle:  # every idle connection ends: 36 at once (over the cap), 4 after the 1 s request timeout
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
        assert closed == 40 and srv.refused >= 1  # (how many were refused depends on when slots freed up)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200  # and the listener still serves
    finally:
        for s in idle:
            s.close()
        srv.shutdown()
        srv.server_close()
