"""agent.pipeline.sources.upstream over real ZeroMQ on tcp 127.0.0.1, fed by tests/upstream_sender.py with the shared
clip's frames."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from ports import free_port
from upstream_sender import message, send, video_frames

from agent.pipeline.sources.upstream import Malformed, UpstreamOptions, UpstreamSource, decode_message, jpeg_size
from agent.types import Frame, TrackedFace

pytestmark = pytest.mark.timeout(30)
Item = tuple[Frame, list[TrackedFace]]


@pytest.fixture(scope="module")
def clip(shared_dir: Path) -> Path:
    return shared_dir / "data" / "video" / "short_hamilton_clip.mp4"  # 640x360


@pytest.fixture(scope="module")
def frames(clip: Path) -> list[Frame]:
    return list(video_frames(clip, "door", limit=12))


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def tracks(frame: Frame) -> list[dict]:
    """Every fourth frame has no face; odd frames add a track with neither score nor landmarks."""
    i = frame.index
    if i % 4 == 3:
        return []
    lead = {"id": 7, "box": [100 + i, 50, 180.5 + i, 160.25], "score": 0.875,
            "landmarks": [[120 + i, 90], [160 + i, 90], [140 + i, 115], [125 + i, 135], [155 + i, 135]]}
    return [lead, {"id": 9, "box": [400, 60, 440, 110]}] if i % 2 else [lead]


def collect(source: UpstreamSource, n: int, timeout: float = 15.0) -> list[Item]:
    """The first n items, or fewer if `timeout` s pass first."""
    timer = threading.Timer(timeout, source.stop)
    timer.start()
    items = []
    try:
        for item in source.frames():
            items.append(item)
            if len(items) == n:
                break
    finally:
        timer.cancel()
    return items


def assert_intact(item: Item, sent: Frame, exact: bool) -> None:
    frame, faces = item
    assert (frame.camera, frame.index, frame.pts) == (sent.camera, sent.index, sent.pts)
    assert frame.image.shape == sent.image.shape and frame.image.dtype == np.uint8 and frame.wall_time > 0
    error = np.abs(frame.image.astype(int) - sent.image).mean()
    assert error == 0 if exact else error < 3  # JPEG at quality 90
    expected = tracks(sent)
    assert [f.track_id for f in faces] == [t["id"] for t in expected]
    for face, track in zip(faces, expected, strict=True):
        np.testing.assert_array_equal(face.det.bbox, np.float32(track["box"]))
        assert face.det.score == track.get("score", 1.0)
        if "landmarks" in track:
            np.testing.assert_array_equal(face.det.landmarks, np.float32(track["landmarks"]))
        else:
            assert face.det.landmarks is None


@pytest.mark.parametrize("encoding", ["jpeg", "raw"])
def test_frames_and_tracks_arrive_intact(frames: list[Frame], endpoint: str, encoding: str) -> None:
    source = UpstreamSource(UpstreamOptions(endpoint))
    with ThreadPoolExecutor() as pool:
        sent = pool.submit(send, endpoint, frames, tracks, encoding=encoding)
        items = collect(source, len(frames))
        assert sent.result(10) == len(frames)
    assert len(items) == len(frames) and (source.received, source.malformed) == (len(frames), 0)
    for item, frame in zip(items, frames, strict=True):
        assert_intact(item, frame, exact=encoding == "raw")


def test_cameras_sharing_a_bound_subscriber(clip: Path, endpoint: str) -> None:
    source = UpstreamSource(UpstreamOptions(endpoint, bind=True))
    lobby, door = list(video_frames(clip, "lobby", limit=8)), list(video_frames(clip, "door", limit=5))
    with ThreadPoolExecutor() as pool:
        sent = [pool.submit(send, endpoint, cam, tracks, bind=False, encoding=enc)
                for cam, enc in ((lobby, "jpeg"), (door, "raw"))]
        items = collect(source, 13)
        assert [s.result(10) for s in sent] == [8, 5]
    by_camera = {cam: [item for item in items if item[0].camera == cam] for cam in ("lobby", "door")}
    assert [f.index for f, _ in by_camera["lobby"]] == list(range(8))  # in order within each camera
    assert [f.index for f, _ in by_camera["door"]] == list(range(5))
    for cam, sent_frames in (("lobby", lobby), ("door", door)):
        for item, frame in zip(by_camera[cam], sent_frames, strict=True):
            assert_intact(item, frame, exact=cam == "door")


def publish(endpoint: str, messages: list[list[bytes]]) -> None:
    """Send raw multipart messages from a bound XPUB once a subscriber is there."""
    with zmq.Context.instance().socket(zmq.XPUB) as sock:
        sock.setsockopt(zmq.LINGER, 5000)  # closing waits for what is queued to go out
        sock.bind(endpoint)
        assert sock.poll(10_000), "no subscriber"
        sock.recv()
        for parts in messages:
            sock.send_multipart(parts)


def test_malformed_messages_are_counted_logged_and_skipped(frames: list[Frame], endpoint: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    header, jpeg = message(frames[0], tracks(frames[0]))
    meta = json.loads(header)
    _, raw = message(frames[2], [], "raw")
    bad = {
        "not JSON": [b"{camera: door", jpeg],
        "header lacks pts": [json.dumps({k: v for k, v in meta.items() if k != "pts"}).encode(), jpeg],
        "does not decode": [header, b"\xff\xd8\xff\xe0 not a JPEG"],
        "shape [360, 640, 3] needs 691200": [json.dumps({**meta, "encoding": "raw", "shape": [360, 640, 3]}).encode(),
                                             raw[:-640]],
        "tracks[0].box [30.0, 10.0, 20.0, 40.0] needs x1 < x2": [
            json.dumps({**meta, "tracks": [{"id": 1, "box": [30, 10, 20, 40]}]}).encode(), jpeg],
        "tracks[1].landmarks must be five [x, y] points": [
            json.dumps({**meta, "tracks": [{"id": 1, "box": [0, 0, 9, 9]}, {"id": 2, "box": [0, 0, 9, 9],
                                                                          "landmarks": [[1, 2]]}]}).encode(), jpeg],
        "1 message frames": [header],
    }
    messages = [[header, jpeg], *bad.values(), message(frames[1], tracks(frames[1]), topic=b"door")]
    source = UpstreamSource(UpstreamOptions(endpoint))
    with caplog.at_level(logging.ERROR, logger="agent.pipeline.sources.upstream"), ThreadPoolExecutor() as pool:
        done = pool.submit(publish, endpoint, messages)
        items = collect(source, 2)
        done.result(10)
    assert len(items) == 2 and (source.received, source.malformed) == (len(messages), len(bad))
    assert_intact(items[0], frames[0], exact=False)
    assert_intact(items[1], frames[1], exact=False)  # after all the bad ones, and with a topic frame
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == len(bad)
    for cause, error in zip(bad, errors, strict=True):
        assert cause in error and "malformed message skipped" in error


def test_topic_filter_takes_matching_topic_frames_only(frames: list[Frame], endpoint: str) -> None:
    topics = [b"cam1", b"cam2", None, b"cam10", b"cam1"]
    messages = [message(frames[i], tracks(frames[i]), topic=topic) for i, topic in enumerate(topics)]
    source = UpstreamSource(UpstreamOptions(endpoint, topic=b"cam1"))
    with ThreadPoolExecutor() as pool:
        done = pool.submit(publish, endpoint, messages)
        items = collect(source, 3)
        done.result(10)
    assert [f.index for f, _ in items] == [0, 3, 4] and source.received == 3


def test_stop_ends_iteration_promptly(endpoint: str) -> None:
    source = UpstreamSource(UpstreamOptions(endpoint, poll_ms=100))  # nobody publishes there
    reader = threading.Thread(target=lambda: list(source.frames()))
    reader.start()
    time.sleep(0.3)
    start = time.monotonic()
    source.stop()
    reader.join(30)
    assert not reader.is_alive() and time.monotonic() - start < 10  # within a poll (0.1 s), with room


def test_sender_script_sends_boxes_from_a_json_file(clip: Path, frames: list[Frame], endpoint: str,
                                                    tmp_path: Path) -> None:
    boxes = {str(i): tracks(frames[i]) for i in (0, 1, 2)}  # frames 3 and 4: none
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    script = Path(__file__).parents[1] / "upstream_sender.py"
    proc = subprocess.Popen([sys.executable, str(script), "--video", str(clip), "--endpoint", endpoint, "--camera",
                             "door", "--encoding", "raw", "--topic", "door", "--limit", "5", "--boxes",
                             str(tmp_path / "boxes.json")])
    items = collect(UpstreamSource(UpstreamOptions(endpoint, topic=b"door")), 5)
    assert proc.wait(20) == 0
    assert [f.index for f, _ in items] == list(range(5))
    for frame, faces in items:
        assert [f.track_id for f in faces] == [t["id"] for t in boxes.get(str(frame.index), [])]
        np.testing.assert_array_equal(frame.image, frames[frame.index].image)


def hostile_messages(frame: Frame) -> dict[str, list[bytes]]:
    """Messages from the security review that each ended the upstream camera before (issue: hostile input), by the
    cause the skip must name."""
    header, jpeg = message(frame, [])
    meta = json.loads(header)
    tiny = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()
    sof = next(i for i in range(2, len(tiny) - 1) if tiny[i] == 0xFF and tiny[i + 1] == 0xC0)
    huge = tiny[: sof + 5] + (20000).to_bytes(2, "big") * 2 + tiny[sof + 9 :]  # the header claims 20000x20000
    big = 10**400
    box = [10, 10, 50, 50]

    def with_(**kw) -> list[bytes]:
        return [json.dumps({**meta, **kw}).encode(), jpeg]

    return {
        "over max_pixels": [header, huge],
        "not JSON: RecursionError": [b"[" * 100_000, jpeg],
        "pts must be a number": with_(pts=big),
        "frame_id must be an integer": with_(frame_id=big),
        "tracks[0].score must be a number": with_(tracks=[{"id": 1, "box": box, "score": big}]),
        "tracks[0].box must be": with_(tracks=[{"id": 1, "box": [10, 10, big, 50]}]),
        "tracks[0].id must be an integer": with_(tracks=[{"id": big, "box": box}]),
        "lies outside the 640x360 image": with_(tracks=[{"id": 1, "box": [5000, 5000, 5100, 5100]}]),
        "65 tracks, over max_tracks 64": with_(tracks=[{"id": i, "box": box} for i in range(65)]),
        "camera must be 1 to 64 of A-Z a-z 0-9 _ . -, got 'door\\nINFO forged'": with_(camera="door\nINFO forged"),
        "camera must be 1 to 64": with_(camera="c" * 300),
        "raw image 100000x100000 is over max_pixels": [
            json.dumps({**meta, "encoding": "raw", "shape": [100_000, 100_000, 3]}).encode(), b"x"],
    }


def test_hostile_messages_are_skipped_with_their_cause(frames: list[Frame]) -> None:
    """decode_message raises Malformed naming the cause for each, and nothing else (before: RecursionError,
    OverflowError, a 400 MP allocation, or a box that later crashed the crop)."""
    assert len(frames[0].image) == 360
    for cause, parts in hostile_messages(frames[0]).items():
        with pytest.raises(Malformed, match=re.escape(cause)):
            decode_message(parts)
    assert jpeg_size(cv2.imencode(".jpg", frames[0].image)[1].tobytes()) == (360, 640)


def test_hostile_messages_do_not_end_the_source(frames: list[Frame], endpoint: str) -> None:
    bad = hostile_messages(frames[0])
    messages = [*bad.values(), message(frames[1], tracks(frames[1]))]
    source = UpstreamSource(UpstreamOptions(endpoint))
    with ThreadPoolExecutor() as pool:
        done = pool.submit(publish, endpoint, messages)
        items = collect(source, 1)
        done.result(10)
    assert len(items) == 1 and (source.received, source.malformed) == (len(messages), len(bad))
    assert_intact(items[0], frames[1], exact=False)


def test_messages_over_max_message_bytes_never_arrive(frames: list[Frame], endpoint: str) -> None:
    """ZeroMQ's MAXMSGSIZE drops the connection of a peer that sends a bigger message: nothing of it is read."""
    source = UpstreamSource(UpstreamOptions(endpoint, max_message_bytes=100_000))
    big = message(frames[0], [], "raw")  # 691,200 image bytes
    with ThreadPoolExecutor() as pool:
        done = pool.submit(publish, endpoint, [big])
        items = collect(source, 1, timeout=3.0)
        done.result(10)
    assert items == [] and source.received == 0


def test_a_face_that_cannot_be_cropped_is_skipped_alone(frames: list[Frame], caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """Five identical landmarks with a template-crop model made the aligner raise and ended the camera's worker;
    now that face is skipped (logged, counted) and the frame's other faces go on to the scorer."""
    import queue

    from agent.common.fr_spec import FRSpec
    from agent.pipeline.runner import CameraConfig, CameraWorker, StageTimes
    from agent.pipeline.select import TokenBucket
    from agent.types import Detection

    arcface = FRSpec(name="arcface-like", path="unused.onnx", input_size=112, crop="template", margin=0.0)
    out: queue.Queue = queue.Queue()
    worker = CameraWorker(CameraConfig("line3", upstream=UpstreamOptions("tcp://127.0.0.1:1")), arcface, out,
                          TokenBucket(None), StageTimes())
    good = np.array([[260, 150], [300, 150], [280, 175], [265, 200], [295, 200]], np.float32)
    faces = [TrackedFace(1, Detection(np.array([240, 120, 320, 220], np.float32), 0.9, np.full((5, 2), 200.0))),
             TrackedFace(2, Detection(np.array([240, 120, 320, 220], np.float32), 0.9, good))]
    frame = Frame("line3", 0, 0.0, cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (360, 640, 3), np.uint8),
                                                    (3, 3), 0))  # textured: the sharpness gate lets it through
    with caplog.at_level(logging.ERROR, logger="agent.pipeline.runner"):
        worker._frame(frame, faces, {})
    assert worker.skipped_faces == 1
    queued = [out.get_nowait() for _ in range(out.qsize())]
    assert [c.track_id for c in queued if hasattr(c, "crop")] == [2]
    assert any("track 1: face skipped" in r.getMessage() and "degenerate" in r.getMessage() for r in caplog.records)


def test_camera_names_beyond_max_cameras_are_skipped(frames: list[Frame], endpoint: str) -> None:
    """Each new camera name creates state and a metric series: an input takes at most max_cameras of them."""
    sent = [message(Frame(cam, i, 0.0, frames[0].image), []) for i, cam in enumerate(["a", "b", "c", "a", "b"])]
    source = UpstreamSource(UpstreamOptions(endpoint, max_cameras=2))
    with ThreadPoolExecutor() as pool:
        done = pool.submit(publish, endpoint, sent)
        items = collect(source, 4)
        done.result(10)
    assert [f.camera for f, _ in items] == ["a", "b", "a", "b"] and source.malformed == 1
    assert source.cameras == {"a", "b"}


def test_upstream_tracks_end_by_wall_clock_too() -> None:
    """A stream whose pts stand still never ended its tracks (each kept a crop); the wall clock ends them now."""
    from agent.pipeline.runner import _Ends
    from agent.types import Detection

    face = TrackedFace(7, Detection(np.array([0, 0, 10, 10], np.float32), 1.0))
    ends = _Ends(max_lost_s=1.0)
    assert ends.update([face], pts=5.0, wall=100.0) == []
    assert ends.update([], pts=5.0, wall=100.5) == []  # same pts, half a second later
    assert ends.update([], pts=5.0, wall=101.2) == [7]  # same pts, but 1.2 s of wall time without it
    assert ends.update([face], pts=6.0, wall=102.0) == []
    assert ends.expire(None, 103.5) == [7]  # another camera's message: this camera fell silent


def test_a_failed_live_worker_is_restarted_and_reported(frames: list[Frame], endpoint: str, monkeypatch) -> None:
    """A live input's worker that dies anyway (here: its first frame raises) was left dead, and `run` ended with
    exit 0 once no other camera was alive; now it is restarted after a backoff and /healthz says so meanwhile."""
    from agent.common.fr_spec import FACENET
    from agent.pipeline.runner import CameraConfig, CameraWorker, Pipeline
    from agent.pipeline.score import build_scorer
    from agent.service.metrics import Liveness

    real, calls = CameraWorker._frame, []

    def flaky(self, *args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(self, *args)

    monkeypatch.setattr(CameraWorker, "_frame", flaky)
    scorer, _ = build_scorer(FACENET)
    pipeline = Pipeline([CameraConfig("line3", upstream=UpstreamOptions(endpoint))], FACENET, scorer, lambda s: True)
    runner = threading.Thread(target=pipeline.run, daemon=True)
    runner.start()
    sent, healths = 0, []
    with zmq.Context.instance().socket(zmq.PUB) as pub:
        pub.bind(endpoint)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (pipeline.restarts and len(calls) > 3):
            pub.send_multipart(message(frames[sent % len(frames)], []))
            sent += 1
            if pipeline.pending:
                healths.append(Liveness(pipeline).health())
            time.sleep(0.05)
    pipeline.stop()
    runner.join(10)
    assert not runner.is_alive()
    assert pipeline.restarts == {"line3": 1} and len(calls) > 3  # the new worker took frames
    ok, body = healths[0]
    assert not ok and "camera line3: worker failed (RuntimeError: boom); restarting" in body["reasons"]
    assert body["cameras"]["line3"]["restarts"] == 1 and body["cameras"]["line3"]["up"] is False


@pytest.mark.parametrize("who", ["allowed", "stranger", "plain"])
def test_curve_upstream_takes_allowed_senders_only(frames: list[Frame], endpoint: str, tmp_path: Path,
                                                   who: str) -> None:
    """Any local user could inject faces into the upstream input; with CURVE only allowed senders get through."""
    from agent.common.keys import check_secret_file, generate_keys, load_public_key

    agent_keys = generate_keys(tmp_path / "agent", "agent")
    sender = generate_keys(tmp_path / "senders", "line3")
    stranger = generate_keys(tmp_path / "senders", "stranger")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / sender[0].name).write_bytes(sender[0].read_bytes())
    source = UpstreamSource(UpstreamOptions(endpoint, bind=True, curve_secret_key=agent_keys[1],
                                            curve_authorized_keys_dir=allowed))
    items: list[Item] = []
    reader = threading.Thread(target=lambda: items.extend(collect(source, 1, timeout=4.0)))
    reader.start()
    with zmq.Context() as ctx, ctx.socket(zmq.PUB) as pub:
        pub.setsockopt(zmq.LINGER, 0)
        if who != "plain":
            pub.curve_serverkey = load_public_key(agent_keys[0])
            pub.curve_publickey, pub.curve_secretkey = check_secret_file((sender if who == "allowed" else stranger)[1])
        pub.connect(endpoint)
        while reader.is_alive():  # PUB drops until the subscription arrives: keep sending until the reader ends
            pub.send_multipart(message(frames[0], tracks(frames[0])))
            time.sleep(0.05)
    reader.join()
    assert len(items) == (1 if who == "allowed" else 0)
    if who == "allowed":
        assert_intact(items[0], frames[0], exact=False)


def test_open_upstream_tracks_are_bounded_per_camera() -> None:
    """Each open track holds crops; an upstream that never repeats an id opened them without bound."""
    from agent.pipeline.runner import _Ends
    from agent.types import Detection

    def face(i: int) -> TrackedFace:
        return TrackedFace(i, Detection(np.array([0, 0, 10, 10], np.float32), 1.0))

    ends = _Ends(max_lost_s=10.0, max_open=3)
    assert ends.update([face(1), face(2), face(3)], pts=0.0, wall=0.0) == []
    assert ends.update([face(1)], pts=0.1, wall=0.1) == []  # 1 seen again: 2 is now the least recently seen
    assert ends.update([face(4), face(5)], pts=0.2, wall=0.2) == [2, 3]
    assert list(ends.last) == [1, 4, 5]


def test_a_silent_upstream_input_still_ends_its_tracks(frames: list[Frame], endpoint: str) -> None:
    """Tracks ended only when a later message came; an input that falls silent now ends them on its own clock."""
    import queue

    from agent.common.fr_spec import FACENET
    from agent.pipeline.runner import CameraConfig, CameraWorker, StageTimes
    from agent.pipeline.select import TokenBucket, TrackEnd
    from agent.pipeline.track import TrackerConfig

    out: queue.Queue = queue.Queue()
    cam = CameraConfig("line3", upstream=UpstreamOptions(endpoint, poll_ms=50), tracker=TrackerConfig(max_lost_s=0.5))
    worker = CameraWorker(cam, FACENET, out, TokenBucket(None), StageTimes())
    worker.start()
    try:
        with zmq.Context.instance().socket(zmq.PUB) as pub:
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(endpoint)
            deadline = time.monotonic() + 10
            while worker.frames == 0 and time.monotonic() < deadline:  # until the subscription is through
                pub.send_multipart(message(frames[0], [{"id": 5, "box": [240, 100, 330, 210]}]))
                time.sleep(0.05)
            assert worker.frames >= 1
            ends, deadline = [], time.monotonic() + 5  # then silence: no message at all
            while not ends and time.monotonic() < deadline:
                item = out.get(timeout=5)
                if isinstance(item, tuple) and isinstance(item[0], TrackEnd):
                    ends.append(item[0])
        assert [e.track_id for e in ends] == [5]
    finally:
        worker.stop()
        worker.join(5)



def test_open_upstream_tracks_are_bounded_over_the_input() -> None:
    """Per camera is not enough: 16 cameras x 64 tracks of whole-frame crops would not fit an 8 GB box."""
    import queue

    from agent.common.fr_spec import FACENET
    from agent.pipeline.runner import CameraConfig, CameraWorker, StageTimes, _Ends
    from agent.pipeline.select import TokenBucket, TrackEnd
    from agent.pipeline.track import TrackerConfig

    out: queue.Queue = queue.Queue()
    cam = CameraConfig("in", upstream=UpstreamOptions("tcp://127.0.0.1:1"),
                       tracker=TrackerConfig(max_open_tracks=10, max_open_tracks_input=4))
    worker = CameraWorker(cam, FACENET, out, TokenBucket(None), StageTimes())
    trackers = {"a": _Ends(10.0, 10), "b": _Ends(10.0, 10)}
    trackers["a"].last = {1: (0.0, 1.0), 2: (0.0, 5.0)}
    trackers["b"].last = {7: (0.0, 2.0), 8: (0.0, 3.0), 9: (0.0, 6.0)}
    ended: list[int] = []
    worker._cap_open(trackers, "a", ended)
    assert ended == [1]  # camera a's least recently seen, left for the caller to end
    ends = [item[0] for item in [out.get_nowait() for _ in range(out.qsize())] if isinstance(item, tuple)]
    assert [] == [e for e in ends if not isinstance(e, TrackEnd)]
    assert sum(len(t.last) for t in trackers.values()) == 4 and 1 not in trackers["a"].last
