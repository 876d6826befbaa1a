"""`bestshot bench cameras` on the embedded demo clip: one and two cameras at 2 fps for 3 s of media (slow enough to
hold on a loaded 2-core box), each run a real agent in its own process; the report's figures must add up."""

from __future__ import annotations

import io

import pytest

from agent.cli.bench_cameras import STAGES, CameraBench, bench_cameras, shots_changed
from agent.cli.main import parse_counts
from agent.pipeline.sources.demo import demo_clip_path

pytestmark = pytest.mark.timeout(400)


def test_counts_and_shots_changed() -> None:
    assert parse_counts("1-4") == [1, 2, 3, 4] and parse_counts("4,1,2") == [1, 2, 4]
    refs = {"a": {"tracks": {"cam0/1": 10, "cam0/2": 40},
                  "qualities": {"cam0/1": {10: 0.9, 11: 0.8}, "cam0/2": {40: 0.7, 41: 0.69}}},
            "b": {"tracks": {"cam0/1": 7}, "qualities": {"cam0/1": {7: 0.5}}}}
    run = {"cameras": 3, "tracks": {"cam0/1": 10, "cam0/2": 41, "cam1/1": 7, "cam2/1": 10, "cam2/9": 5}}
    # cam0 plays a: track 2 changed (0.01 lost); cam1 plays b: same; cam2 plays a: track 2 missing (all of its 0.7
    # lost; track 9 is not in a)
    assert shots_changed(run, refs, ("a", "b")) == (2, 5, pytest.approx(0.7))
    run["tracks"]["cam2/2"] = 41
    assert shots_changed(run, refs, ("a", "b")) == (2, 5, pytest.approx(0.01))


def test_the_bench_runs_the_detector_and_precision_it_is_given(shared_dir) -> None:
    from agent.service.config import parse_config

    yunet = str(shared_dir / "models/yunet_s_dynamic.onnx")
    bench = CameraBench(("a.mp4", "b.mp4"), detect_input=480, detector="yunet", detector_model=yunet, precision="int8")
    cfg = parse_config(bench.config(3, paced=True))
    cams = cfg.camera_configs()
    assert cfg.scoring.precision == "int8"
    assert [(c.url, c.detector.kind, c.detector.path, c.detector.input_size) for c in cams] == [
        ("a.mp4", "yunet", yunet, 480), ("b.mp4", "yunet", yunet, 480), ("a.mp4", "yunet", yunet, 480)]
    default = parse_config(CameraBench(("a.mp4",)).config(1, paced=True)).camera_configs()
    assert [(c.detector.kind, c.detector.path) for c in default] == [("centerface", None)]


def test_bench_cameras_report_adds_up() -> None:
    bench = CameraBench((str(demo_clip_path()),), fps=2.0, duration_s=3.0, budget=30.0)
    out = io.StringIO()
    res = bench_cameras(bench, [1, 2], out)
    ref = next(iter(res["references"].values()))
    per_camera = 6  # 3 s at 2 fps
    assert ref["frames"] == ref["frames_offered"] == per_camera and ref["dropped"] == 0 and ref["shots"] >= 1
    held = [r for r in res["runs"] if not r["dropped"]]
    assert res["max_cameras"] == (held[-1]["cameras"] if held else 0) and [r["cameras"] for r in held] == [1, 2]
    for r in res["runs"]:
        n = r["cameras"]
        assert r["frames_offered"] == n * per_camera and r["frames"] + r["dropped"] == r["frames_offered"]
        assert {"decode", "detect", "align"} <= set(r["stage_ms_per_frame"]) <= set(STAGES)
        assert r["faces_scored"] <= r["faces_detected"] and 0 < r["cpu_cores"] and 100 < r["peak_rss_mb"]
        # 3 s of the demo: every track is still open when the media runs out, and flushed then
        assert r["shots"] >= n and r["flush_to_message_ms_median"] is not None
        assert r["tracks_compared"] == n * ref["tracks"] and r["tracks"] >= n
        assert 0 <= r["shots_changed"] <= r["tracks_compared"]
    # 2 fps: every face is scored within the budget, so the shots are the unlimited reference's
    assert [r["shots_changed"] for r in held] == [0, 0] and res["max_cameras_same_shots"] == res["max_cameras"]
    assert [r["quality_lost"] for r in held] == [0.0, 0.0]
    text = out.getvalue()
    assert "reference (unpaced, unlimited scoring)" in text and f"without a dropped frame: {res['max_cameras']}" in text
    assert f"on 90% of tracks too: {res['max_cameras_same_shots']}" in text
