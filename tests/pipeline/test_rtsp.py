"""The loopback RTSP server (tests/rtsp_server.py) decoded by PyAV over TCP and UDP, and through
agent.pipeline.sources.video."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from agent.pipeline.sources import video

pytestmark = pytest.mark.timeout(60)
Server = Callable[..., Any]  # the rtsp_server fixture (tests/conftest.py)


def _decode(url: str, transport: str = "tcp", limit: int | None = None) -> list[av.VideoFrame]:
    frames = []
    with av.open(url, options={"rtsp_transport": transport}, timeout=(5, 5)) as container:
        for frame in container.decode(container.streams.video[0]):
            frames.append(frame)
            if len(frames) == limit:
                break
    return frames


def _steps(frames: list[av.VideoFrame]) -> np.ndarray:
    """Differences of the frames' timestamps; ffmpeg gives the very first frame of an RTSP stream none."""
    assert all(f.time is not None for f in frames[1:])
    return np.diff([f.time for f in frames if f.time is not None])


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_pyav_decodes_the_stream(rtsp_server: Server, transport: str) -> None:
    frames = _decode(rtsp_server().url, transport, limit=120)
    assert len(frames) == 120
    assert {(f.width, f.height) for f in frames} == {(640, 360)}
    steps = _steps(frames)
    assert (steps > 0).all()
    assert np.median(steps) == pytest.approx(1 / 29.97, rel=0.01)


def test_stream_ends_with_the_file_and_loops_on_request(rtsp_server: Server, shared_dir: Path) -> None:
    crowd = shared_dir / "data" / "video" / "facenet_pytorch_video.mp4"  # 1920x1080 H.264, 25 fps, 105 frames
    once = _decode(rtsp_server(crowd).url)
    assert len(once) == 105 and (once[0].width, once[0].height) == (1920, 1080)
    looped = _decode(rtsp_server(crowd, loop=True).url, limit=150)
    steps = _steps(looped)
    assert len(looped) == 150 and (steps > 0).all() and steps.max() < 0.1  # past the end, no gap, no step back


def test_each_client_gets_the_file_from_its_start(rtsp_server: Server) -> None:
    server = rtsp_server()
    with av.open(server.url, options={"rtsp_transport": "tcp"}, timeout=(5, 5)) as first:
        early = [f.to_ndarray(format="gray") for _, f in zip(range(60), first.decode(video=0), strict=False)]
        late = _decode(server.url, limit=2)[1].to_ndarray(format="gray")  # the first client is 2 s into the file
    assert np.abs(late.astype(int) - early[1]).mean() < 1 < np.abs(late.astype(int) - early[59]).mean()


def test_ingest_reads_the_stream_and_reconnects_after_a_restart(rtsp_server: Server) -> None:
    server = rtsp_server(loop=True)
    source = video.open_source(server.url, "door", video.SourceOptions(transport="tcp", backoff_initial_s=0.2))
    try:
        frames = source.frames()
        before = [next(frames) for _ in range(100)]
        assert {(f.camera, f.image.shape) for f in before} == {("door", (360, 640, 3))}
        assert (np.diff([f.pts for f in before]) > 0).all() and (np.diff([f.index for f in before]) > 0).all()
        server.kill()
        deadline = time.monotonic() + 10
        while source.stats.up:  # until the reader has seen the connection drop
            assert time.monotonic() < deadline, "the source did not notice the server's death"
            time.sleep(0.05)
        server.start()
        restarted = time.time()
        after = next(f for f in frames if f.wall_time > restarted)
        assert source.stats.reconnects >= 1 and after.index > before[-1].index
        assert after.image.shape == (360, 640, 3)
    finally:
        source.stop()
