"""VideoSource on real media: the shared clip, damaged copies of it, a refused RTSP url, an HTTP server."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
from ports import free_port

from agent.pipeline.sources.video import SourceOptions, VideoSource, is_live, open_source, redact

SHARED = Path(__file__).resolve().parents[3] / "shared"
CLIP = SHARED / "data" / "video" / "short_hamilton_clip.mp4"  # 640x360, 29.97 fps, 275 frames, first pts 0.852 s

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def clip() -> Path:
    if not CLIP.is_file():
        pytest.skip(f"{CLIP} is absent")
    return CLIP


@pytest.fixture(scope="module")
def faststart(clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clip remuxed with its index first, so a truncated copy still opens (the original's index is last)."""
    dst = tmp_path_factory.mktemp("media") / "faststart.mp4"
    with av.open(str(clip)) as src, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


def test_is_live_and_redact() -> None:
    assert is_live("rtsp://cam/1") and is_live("HTTP://host/a.mp4") and is_live("udp://@:5000")
    assert not is_live("/data/a.mp4") and not is_live("a.mp4") and not is_live("file.mkv")
    assert redact("rtsp://admin:s3cret@10.0.0.2:554/live") == "rtsp://admin:***@10.0.0.2:554/live"
    assert redact("rtsp://10.0.0.2/live") == "rtsp://10.0.0.2/live"
    assert redact("http://10.0.0.3/cgi-bin/snap.cgi?user=admin&pwd=h%26x&chn=1") == (
        "http://10.0.0.3/cgi-bin/snap.cgi?user=admin&pwd=***&chn=1")
    assert redact("rtsp://u:p@cam/s?token=abc&x=1&apiKey=zz&password=q") == (
        "rtsp://u:***@cam/s?token=***&x=1&apiKey=***&password=***")
    assert redact("/videos/file.mp4") == "/videos/file.mp4"
    with pytest.raises(ValueError, match="transport"):
        SourceOptions(transport="quic")


def test_file_delivers_every_frame_in_order(clip: Path) -> None:
    src = open_source(str(clip), "cam0", SourceOptions(queue_size=2))  # a file blocks the reader when full
    frames = []
    for frame in src.frames():
        time.sleep(0.001)
        frames.append(frame)
    assert [f.index for f in frames] == list(range(275))
    pts = np.array([f.pts for f in frames])
    assert pts[0] == pytest.approx(0.852, abs=1e-3) and np.all(np.diff(pts) > 0)
    assert np.diff(pts).mean() == pytest.approx(1 / 29.97, rel=1e-3)
    assert {f.camera for f in frames} == {"cam0"}
    assert frames[100].image.shape == (360, 640, 3) and frames[100].image.dtype == np.uint8
    assert frames[100].image.std() > 10 and frames[100].wall_time > 0
    stats = src.stats
    assert (stats.decoded, stats.dropped_queue, stats.dropped_fps, stats.errors) == (275, 0, 0, 0)
    assert stats.last_error is None and not stats.up and not stats.gave_up and src.stop()  # ended normally


def test_slow_consumer_drops_oldest(clip: Path) -> None:
    src = VideoSource(str(clip), "cam0", SourceOptions(queue_size=3, drop_when_full=True))
    frames = []
    for frame in src.frames():
        time.sleep(0.01)
        frames.append(frame)
    stats, indices = src.stats, [f.index for f in frames]
    assert stats.dropped_queue > 0 and len(frames) + stats.dropped_queue == stats.decoded == 275
    assert all(b > a for a, b in zip(indices, indices[1:], strict=False)) and max(np.diff(indices)) > 1
    assert indices[-1] == 274  # the newest frames survive


def test_max_fps_halves_the_frames(clip: Path) -> None:
    src = open_source(str(clip), "cam0", SourceOptions(max_fps=15))
    frames = list(src.frames())
    assert len(frames) == 138 and src.stats.dropped_fps == 137
    assert [f.index for f in frames] == list(range(0, 275, 2))
    assert np.diff([f.pts for f in frames]).min() > 1 / 15 - 1e-3


def test_loop_replays_with_increasing_pts(clip: Path) -> None:
    src = open_source(str(clip), "cam0", SourceOptions(loop=True))
    it = src.frames()
    frames = [next(it) for _ in range(300)]
    assert src.stop(timeout=2)
    pts = np.array([f.pts for f in frames])
    assert [f.index for f in frames] == list(range(300)) and np.all(np.diff(pts) > 0)
    assert pts[275] - pts[274] == pytest.approx(1 / 29.97, rel=1e-2)
    assert np.array_equal(frames[275].image, frames[0].image)


def test_duration_ends_a_looped_file_and_realtime_paces_it(clip: Path) -> None:
    src = open_source(str(clip), "cam0", SourceOptions(loop=True, duration_s=10.0))  # 275 frames, then a replay
    frames = list(src.frames())
    assert len(frames) == 300 and frames[-1].pts - frames[0].pts < 10.0 and not src.stats.gave_up
    t0 = time.monotonic()
    src = open_source(str(clip), "cam0", SourceOptions(realtime=True, duration_s=1.5, drop_when_full=True))
    frames = list(src.frames())
    stats = src.stats
    assert time.monotonic() - t0 >= frames[-1].pts - frames[0].pts >= 1.4  # no frame before its time
    assert len(frames) + stats.dropped_late + stats.dropped_queue == stats.decoded == 45


def test_truncated_file_delivers_frames_before_the_cut(faststart: Path, tmp_path: Path, caplog) -> None:
    cut = tmp_path / "cut.mp4"
    data = faststart.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.4)])
    with caplog.at_level(logging.ERROR, logger="agent.pipeline.sources.video"):
        src = open_source(str(cut), "cam1")
        frames = list(src.frames())
    assert 50 < len(frames) < 275 and [f.index for f in frames] == list(range(len(frames)))
    stats = src.stats
    assert not stats.up and stats.errors == 1 and "truncated" in stats.last_error and stats.gave_up
    assert f"camera cam1: {cut}" in caplog.text


@pytest.mark.parametrize("kind", ["index-last truncated", "random bytes", "missing"])
def test_unreadable_file_ends_cleanly(kind: str, clip: Path, tmp_path: Path, caplog) -> None:
    path = tmp_path / "bad.mp4"
    if kind == "index-last truncated":  # the clip's moov atom comes after its media data
        path.write_bytes(clip.read_bytes()[: int(clip.stat().st_size * 0.4)])
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(200_000))
    with caplog.at_level(logging.ERROR, logger="agent.pipeline.sources.video"):
        src = open_source(str(path), "cam2")
        assert list(src.frames()) == []
    stats = src.stats
    assert not stats.up and stats.errors == 1 and stats.last_error and stats.decoded == 0
    assert stats.gave_up  # failed for good: `bestshot run` exits 1 when every input did
    assert re.search(rf"camera cam2: {re.escape(str(path))}: .+; giving up", caplog.text)


def test_refused_rtsp_reconnects_with_backoff_and_stops(caplog) -> None:
    url = f"rtsp://admin:s3cret@127.0.0.1:{free_port()}/x"
    options = SourceOptions(backoff_initial_s=0.1, backoff_max_s=0.4, connect_timeout_s=1)
    delivered = []
    with caplog.at_level(logging.WARNING, logger="agent.pipeline.sources.video"):
        src = open_source(url, "cam3", options)
        consumer = threading.Thread(target=lambda: delivered.extend(src.frames()))
        consumer.start()
        deadline = time.monotonic() + 30
        while src.stats.reconnects < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert src.stop(timeout=20)
    consumer.join(10)
    stats = src.stats
    assert not consumer.is_alive() and delivered == []
    assert stats.reconnects >= 2 and stats.errors >= 3 and not stats.up and "refused" in stats.last_error.lower()
    assert not stats.gave_up  # a camera that is down is retried until stopped: not a failure for good
    assert "camera cam3: rtsp://admin:***@127.0.0.1" in caplog.text and "refused; retry in 0.1 s" in caplog.text
    assert "retry in 0.2 s" in caplog.text
    assert "s3cret" not in caplog.text


def test_a_live_stream_that_ends_is_down_with_a_cause(clip: Path) -> None:
    """A camera server killed cleanly ends the stream with no error: /healthz still needs a reason beside up=False."""
    src = open_source(str(clip), "cam7", SourceOptions(reconnect=True, drop_when_full=False, backoff_initial_s=30))
    consumer = threading.Thread(target=lambda: list(src.frames()))
    consumer.start()
    deadline = time.monotonic() + 60
    while src.stats.last_error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = src.stats
    assert src.stop(timeout=5)
    consumer.join(5)
    assert stats.decoded == 275 and not stats.up and stats.last_error == "stream ended" and not stats.gave_up


def test_stop_ends_a_blocked_connect() -> None:
    with socket.socket() as server:  # accepts connections and never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        src = open_source(f"http://127.0.0.1:{server.getsockname()[1]}/x", "cam4", SourceOptions(connect_timeout_s=1))
        time.sleep(0.2)
        # the reader is blocked in the connect until connect_timeout_s ends it (a connect without a timeout would
        # block for good); a generous wait for that on a loaded machine
        assert src.stop(timeout=20) and src.stats.decoded == 0


def test_http_source(clip: Path) -> None:
    data = clip.read_bytes()

    class Handler(BaseHTTPRequestHandler):  # serves the clip with byte ranges (FFmpeg seeks to the moov atom)
        def do_GET(self) -> None:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            first, last = (int(m[1]), int(m[2] or len(data) - 1)) if m else (0, len(data) - 1)
            self.send_response(206 if m else 200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(last - first + 1))
            if m:
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            self.end_headers()
            self.wfile.write(data[first : last + 1])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/clip.mp4"
        src = open_source(url, "cam5", SourceOptions(reconnect=False, drop_when_full=False))
        frames = list(src.frames())
    finally:
        server.shutdown()
        server.server_close()
    assert [f.index for f in frames] == list(range(275)) and src.stats.last_error is None
    assert frames[0].pts == pytest.approx(0.852, abs=1e-3)
    with av.open(str(clip)) as ref:
        expected = [f.to_ndarray(format="bgr24") for f in ref.decode(video=0)]
    assert all(np.array_equal(f.image, e) for f, e in zip(frames, expected, strict=True))


def test_defaults_follow_the_source_kind() -> None:
    src = VideoSource("http://127.0.0.1:1/x.mp4", "cam6")
    assert src.reconnect and src.drop_when_full
    src = VideoSource(os.devnull, "cam6", SourceOptions(loop=True))
    assert not src.reconnect and not src.drop_when_full


def test_query_string_secrets_never_reach_logs_or_stats(caplog) -> None:
    """FFmpeg quotes the url in its errors: the `?pwd=` of a camera url was in every reconnect line."""
    url = f"http://127.0.0.1:{free_port()}/cgi-bin/video.cgi?user=admin&pwd=s3cret&token=t0ken"
    options = SourceOptions(backoff_initial_s=0.1, backoff_max_s=0.2, connect_timeout_s=1)
    with caplog.at_level(logging.DEBUG, logger="agent.pipeline.sources.video"):
        src = open_source(url, "cam4", options)
        consumer = threading.Thread(target=lambda: list(src.frames()))
        consumer.start()
        deadline = time.monotonic() + 5
        while src.stats.errors < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert src.stop(timeout=2)
    consumer.join(1)
    assert src.stats.errors >= 2 and src.stats.last_error
    shown = caplog.text + src.stats.last_error
    assert "pwd=***" in caplog.text and "s3cret" not in shown and "t0ken" not in shown
