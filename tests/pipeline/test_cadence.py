"""The detector's cadence on a real frame of the Hamilton clip: still (with sensor noise) it is detected only every
`idle_every_s`; a face pasted in wakes it at once; open tracks and the off setting detect every `detect_every`th."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from agent.pipeline.cadence import Cadence

CLIP = Path(__file__).resolve().parents[3] / "shared" / "data" / "video" / "short_hamilton_clip.mp4"
FPS = 25.0


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    with av.open(str(CLIP)) as c:
        return [f.to_ndarray(format="bgr24") for _, f in zip(range(60), c.decode(video=0), strict=False)]


def noisy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def detected(cadence: Cadence, images: list[np.ndarray], busy: bool = False) -> list[int]:
    return [i for i, im in enumerate(images) if cadence.due(i / FPS, im, busy)]


def test_still_scene_is_detected_every_idle_period(frames: list[np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    still = [noisy(frames[0], rng) for _ in range(100)]  # 4 s of one real frame with sensor noise
    cadence = Cadence(every=1, idle_every_s=1.0)
    assert detected(cadence, still) == [0, 25, 50, 75] and cadence.idle_skipped == 96
    # a face (a crop of a later frame's face region) appears at frame 40: detected there, not at 50
    entered = [im.copy() for im in still]
    for im in entered[40:]:
        im[100:160, 300:350] = frames[59][100:160, 300:350] // 2 + 100
    assert detected(Cadence(every=1, idle_every_s=1.0), entered) == [0, 25, 40, 65, 90]


def test_moving_scene_busy_and_off_detect_every_nth(frames: list[np.ndarray]) -> None:
    still = [frames[0]] * 60
    assert detected(Cadence(every=2, idle_every_s=1.0), still, busy=True) == list(range(0, 60, 2))  # open tracks
    assert detected(Cadence(every=3), still) == list(range(0, 60, 3))  # off: the still scene too
    moving = detected(Cadence(every=1, idle_every_s=10.0), frames)  # the stage performance moves
    assert len(moving) >= 30


def test_every_nth_counts_the_frames_the_worker_takes_not_decoder_indices() -> None:
    """A 30 fps clip capped at 15 fps reaches the worker with even decoder indices only; `detect_every: 2` must still
    detect every 2nd of those frames (it used to take the index, so every frame was detected)."""
    from agent.common.fr_spec import FACENET
    from agent.pipeline.runner import CameraConfig, Pipeline
    from agent.pipeline.score import build_scorer
    from agent.pipeline.sources.video import SourceOptions

    scorer, _ = build_scorer(FACENET)
    cam = CameraConfig(id="capped", url=str(CLIP), detect_every=2,
                       source=SourceOptions(max_fps=15.0, duration_s=4.0))
    pipeline = Pipeline([cam], FACENET, scorer, lambda s: True)
    pipeline.run()
    [worker] = pipeline.finished
    assert worker.source.stats.dropped_fps >= worker.frames - 1 > 50  # the cap dropped every other decoded frame
    assert pipeline.times.n["detect"] == -(-worker.frames // 2)
