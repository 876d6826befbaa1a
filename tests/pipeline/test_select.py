"""Unit tests of agent/pipeline/select.py: the Selector's best shot and emit policy, the Gate's cheap gates and
scoring budget, and the TokenBucket, on hand-built detections, candidates and numpy crops (no models)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from agent.common.images import face_grey
from agent.pipeline.select import (
    BRIGHT_GREY,
    Candidate,
    Gate,
    SelectionConfig,
    Selector,
    TokenBucket,
    TrackEnd,
    cheap_signal,
    sharpness,
)
from agent.types import BestShot, Detection, Scored

pytestmark = pytest.mark.timeout(60)

# A sharp, well-lit crop (uniform noise, grey levels 64-255) and the same crop under a heavy blur; Gate sees them
# through crop_fn.
SHARP = np.random.default_rng(0).integers(64, 256, (160, 160, 3), dtype=np.uint8)
BLURRED = cv2.GaussianBlur(SHARP, (0, 0), sigmaX=12)
CONTEXT = np.zeros((200, 200, 3), np.uint8)
TINY_RATE = 1e-6  # tokens per second: refill during a test is negligible, so only `burst` counts


def det(score: float = 0.9, size: float = 120.0) -> Detection:
    bbox = np.array([10.0, 20.0, 10.0 + size, 20.0 + size * 1.25], np.float32)
    return Detection(bbox=bbox, score=score, landmarks=np.zeros((5, 2), np.float32))


def cand(quality: float, frame_index: int = 0, pts: float = 0.0, track_id: int = 1, camera: str = "cam",
         first_seen: float = 0.0, frames_seen: int = 1) -> Candidate:
    c = Candidate(camera, track_id, frame_index, pts, det(), SHARP, CONTEXT, 123.456, 0.9, first_seen, frames_seen)
    emb = np.full(4, 0.5, np.float32)
    c.scored = Scored(quality=quality, drift=0.2 + frame_index / 100, embedding=emb, cues={"pose": 0.123456789})
    return c


def end(track_id: int = 1, camera: str = "cam", first_seen: float = 1.0, last_seen: float = 9.0,
        frames_seen: int = 42) -> TrackEnd:
    return TrackEnd(camera, track_id, first_seen, last_seen, frames_seen)


def crops(crop: np.ndarray = SHARP) -> Callable[[Detection], tuple[np.ndarray, np.ndarray]]:
    return lambda d: (crop, CONTEXT)


# ---------------------------------------------------------------- Selector


@pytest.mark.parametrize(("quality", "status"), [(0.49, "unrecognisable"), (0.5, "best"), (0.51, "best")])
def test_selector_min_quality_status(quality: float, status: str) -> None:
    sel = Selector(SelectionConfig(min_quality=0.5), "model-x")
    sel.add(cand(0.1, frame_index=0))
    sel.add(cand(quality, frame_index=1))
    shot = sel.end(end())
    assert shot is not None and shot.status == status
    assert shot.quality == quality and shot.frame_index == 1


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_selector_best_is_highest_quality_in_any_order(order: tuple[int, ...]) -> None:
    qualities = [0.3, 0.9, 0.6]
    sel = Selector(SelectionConfig(), "model-x")
    for i in order:
        assert sel.add(cand(qualities[i], frame_index=10 + i, pts=0.5 * i)) is None  # no emit policy set
    shot = sel.end(end(first_seen=1.0, last_seen=9.0, frames_seen=42))
    assert isinstance(shot, BestShot)
    assert (shot.quality, shot.frame_index, shot.best_time) == (0.9, 11, 0.5)
    assert shot.drift == pytest.approx(0.31) and shot.prefiqs == pytest.approx(1 - 0.31 / 2)
    assert (shot.camera, shot.track_id, shot.model_id, shot.status) == ("cam", 1, "model-x", "best")
    # Timing and the frame count come from the TrackEnd, not from the candidates.
    assert (shot.first_seen, shot.last_seen, shot.frames_seen, shot.frames_scored) == (1.0, 9.0, 42, 3)
    assert [e["quality"] for e in shot.extra["top_k"]] == [0.9, 0.6, 0.3]
    assert shot.extra["cues"] == {"pose": 0.12346}
    assert not sel.tracks


def test_selector_top_k_sorted_and_capped() -> None:
    sel = Selector(SelectionConfig(top_k=3), "m")
    qualities = [0.2, 0.7, 0.4, 0.95, 0.1, 0.6]
    for i, q in enumerate(qualities):
        sel.add(cand(q, frame_index=i, pts=i / 4))
    shot = sel.end(end())
    assert shot is not None
    top = shot.extra["top_k"]
    assert [e["quality"] for e in top] == [0.95, 0.7, 0.6]
    assert top[0] == {"frame_index": shot.frame_index, "pts": shot.best_time, "quality": shot.quality}
    assert [e["frame_index"] for e in top] == [3, 1, 5]


def test_selector_top_k_one_keeps_no_list() -> None:
    sel = Selector(SelectionConfig(top_k=1), "m")
    sel.add(cand(0.4))
    shot = sel.end(end())
    assert shot is not None and "top_k" not in shot.extra


def test_selector_enrich_gets_best_and_kept() -> None:
    seen: list[tuple[Candidate, list[Candidate]]] = []

    def enrich(best: Candidate, kept: list[Candidate]) -> dict:
        seen.append((best, kept))
        return {"ers": 0.5}

    sel = Selector(SelectionConfig(top_k=2), "m", enrich=enrich)
    cs = [cand(q, frame_index=i) for i, q in enumerate([0.3, 0.8, 0.5])]
    for c in cs:
        sel.add(c)
    shot = sel.end(end())
    assert shot is not None and shot.extra["ers"] == 0.5
    assert len(seen) == 1 and seen[0][0] is cs[1] and seen[0][1] == [cs[1], cs[2]]


def test_selector_publishes_the_tracks_gated_counts() -> None:
    sel = Selector(SelectionConfig(update_every_s=1.0), "m")
    sel.add(cand(0.7))
    update = sel.add(cand(0.8, frame_index=20, pts=2.0))
    assert update is not None and "gated" not in update.extra  # an update knows no counts yet
    te = end()
    te.gated = {"sharpness": 3, "budget": 1}
    assert sel.end(te).extra["gated"] == {"sharpness": 3, "budget": 1}


def test_selector_unscored_and_unknown_ends() -> None:
    sel = Selector(SelectionConfig(), "m")
    sel.add(cand(0.5, track_id=1, camera="a"))
    assert sel.end(end(track_id=1, camera="b")) is None  # same id on another camera is another track
    assert sel.unscored_ends == 1
    assert sel.end(end(track_id=7, camera="a")) is None
    assert sel.unscored_ends == 2
    assert sel.end(end(track_id=1, camera="a")) is not None
    assert sel.unscored_ends == 2
    assert sel.end(end(track_id=1, camera="a")) is None  # already ended
    assert sel.unscored_ends == 3


def test_selector_update_on_improve() -> None:
    sel = Selector(SelectionConfig(update_on_improve=0.25, min_quality=0.9), "m")
    first = sel.add(cand(0.25, frame_index=0, pts=0.0, first_seen=0.0, frames_seen=3))
    assert first is not None and first.status == "update" and first.quality == 0.25
    assert sel.add(cand(0.49, frame_index=1, pts=0.5, frames_seen=4)) is None  # +0.24: not enough
    assert sel.add(cand(0.1, frame_index=2, pts=1.0, frames_seen=5)) is None
    up = sel.add(cand(0.5, frame_index=3, pts=1.5, first_seen=0.0, frames_seen=6))  # exactly +0.25
    assert up is not None and up.status == "update"
    assert (up.quality, up.frame_index, up.first_seen, up.last_seen, up.frames_seen, up.frames_scored) == (
        0.5, 3, 0.0, 1.5, 6, 4)
    assert sel.add(cand(0.7, frame_index=4, pts=2.0)) is None  # +0.2 since the last update
    # Updates leave the track open; its end still publishes (here below min_quality: "unrecognisable").
    assert ("cam", 1) in sel.tracks
    final = sel.end(end(frames_seen=50))
    assert final is not None and final.status == "unrecognisable"
    assert (final.quality, final.frames_scored, final.frames_seen) == (0.7, 5, 50)


def test_selector_update_every_s() -> None:
    sel = Selector(SelectionConfig(update_every_s=1.0), "m")
    emitted = {pts: sel.add(cand(0.2 + pts / 10, frame_index=int(pts * 4), pts=pts))
               for pts in [0.0, 0.5, 1.0, 1.5, 1.75, 2.25, 3.0]}
    assert [p for p, s in emitted.items() if s is not None] == [0.0, 1.0, 2.25]
    shot = emitted[2.25]
    assert shot is not None and shot.status == "update" and shot.last_seen == 2.25 and shot.frame_index == 9
    final = sel.end(end())
    assert final is not None and final.status == "best" and final.frames_scored == 7 and final.frame_index == 12


def test_selector_trace_events() -> None:
    events: list[dict] = []
    sel = Selector(SelectionConfig(update_on_improve=0.5, min_quality=0.6), "m", trace=events.append)
    sel.add(cand(0.4, frame_index=5, pts=1.23456, camera="c1", track_id=3))
    sel.add(cand(0.5, frame_index=6, pts=2.0, camera="c1", track_id=3))
    sel.end(end(track_id=3, camera="c1", frames_seen=9))
    assert [e["event"] for e in events] == ["scored", "update", "scored", "published"]
    scored = events[0]
    assert scored == {"event": "scored", "camera": "c1", "track_id": 3, "frame_index": 5, "pts": 1.2346,
                      "quality": 0.4, "prefiqs": pytest.approx(1 - 0.25 / 2), "cues": {"pose": 0.123456789},
                      "drift": pytest.approx(0.25), "det_score": pytest.approx(0.9), "size": 120.0,
                      "sharpness": 123.46}
    assert events[1] == {"event": "update", "camera": "c1", "track_id": 3, "frame_index": 5, "quality": 0.4,
                         "status": "update", "frames_seen": 1, "frames_scored": 1}
    assert events[2]["frame_index"] == 6 and events[2]["quality"] == 0.5
    assert events[3] == {"event": "published", "camera": "c1", "track_id": 3, "frame_index": 6, "quality": 0.5,
                         "status": "unrecognisable", "frames_seen": 9, "frames_scored": 2}


# ---------------------------------------------------------------- Gate


def test_test_crops_sharpness() -> None:
    assert sharpness(SHARP) > 1000 and sharpness(BLURRED) < 5  # either side of the default min_sharpness (10)
    assert face_grey(SHARP) > BRIGHT_GREY
    # With size >= 112, sharpness >= 100 and a well-lit face the cheap signal is the detector score itself.
    assert cheap_signal(det(0.7), sharpness(SHARP), BRIGHT_GREY) == pytest.approx(0.7)
    # a face at a quarter of that grey level counts half, as one at a quarter of the sharpness
    assert cheap_signal(det(0.7), sharpness(SHARP), BRIGHT_GREY / 4) == pytest.approx(0.35)
    assert cheap_signal(det(0.7), 25.0, 255.0) == pytest.approx(0.35)


def test_gate_detector_score() -> None:
    calls: list[Detection] = []

    def crop_fn(d: Detection) -> tuple[np.ndarray, np.ndarray]:
        calls.append(d)
        return SHARP, CONTEXT

    g = Gate("cam", SelectionConfig(min_det_score=0.5), TokenBucket(None))
    assert g.observe(0, 0.0, 1, det(score=0.49), crop_fn) is None
    assert g.gated == 1 and not calls  # dropped before the crop is made
    d = det(score=0.5)
    c = g.observe(1, 0.1, 1, d, crop_fn)
    assert c is not None and c.det is d and calls == [d]
    assert g.gated == 1


def test_gate_min_face() -> None:
    g = Gate("cam", SelectionConfig(min_face=24.0), TokenBucket(None))
    assert det(size=23.0).size == 23.0
    assert g.observe(0, 0.0, 1, det(size=23.0), crops()) is None
    assert g.gated == 1
    assert g.observe(1, 0.1, 1, det(size=24.0), crops()) is not None
    assert g.gated == 1


def test_gate_sharpness() -> None:
    g = Gate("cam", SelectionConfig(min_sharpness=10.0), TokenBucket(None))
    assert g.observe(0, 0.0, 1, det(), crops(BLURRED)) is None
    assert g.gated == 1
    c = g.observe(1, 0.1, 1, det(), crops(SHARP))
    assert c is not None and g.gated == 1
    assert c.sharpness == pytest.approx(sharpness(SHARP))
    assert c.cheap == pytest.approx(cheap_signal(c.det, sharpness(SHARP), face_grey(SHARP)))


def test_gate_candidate_fields_and_track_end() -> None:
    g = Gate("cam7", SelectionConfig(), TokenBucket(None))
    assert g.observe(10, 2.0, 4, det(score=0.1), crops()) is None  # gated faces still count as seen
    c = g.observe(11, 2.5, 4, det(), crops())
    assert c is not None
    assert (c.camera, c.track_id, c.frame_index, c.pts, c.first_seen, c.frames_seen) == ("cam7", 4, 11, 2.5, 2.0, 2)
    assert c.crop is SHARP and c.context is CONTEXT and c.scored is None
    g.observe(12, 3.0, 4, det(size=5.0), crops())
    pending, te = g.end(4)
    assert pending is None
    assert te == TrackEnd("cam7", 4, 2.0, 3.0, 3)
    assert te.gated == {"det_score": 1, "face_size": 1}  # by reason, published as extra.gated
    g.observe(13, 3.1, 5, det(), crops(BLURRED))
    assert g.end(5)[1].gated == {"sharpness": 1}


def test_gate_without_budget_sends_every_gated_in_face() -> None:
    g = Gate("cam", SelectionConfig(), TokenBucket(None))
    sent = [g.observe(i, i / 100, 1, det(score=0.8), crops()) for i in range(20)]
    assert all(c is not None for c in sent)
    assert g.deferred == 0
    assert g.end(1)[0] is None


def test_gate_budget_defers_and_end_returns_best_pending() -> None:
    g = Gate("cam", SelectionConfig(), TokenBucket(TINY_RATE, burst=1))
    assert g.observe(0, 0.0, 1, det(score=0.8), crops()) is not None  # spends the only token
    assert g.observe(1, 0.0, 2, det(score=0.6), crops()) is None  # a first face, but no token
    assert g.observe(2, 0.1, 2, det(score=0.9), crops()) is None
    assert g.observe(3, 0.2, 2, det(score=0.7), crops()) is None
    assert g.deferred == 3
    pending, te = g.end(2)
    assert pending is not None and pending.frame_index == 2 and pending.cheap == pytest.approx(0.9)
    assert te is not None and te.frames_seen == 3
    assert te.gated == {"budget": 2}  # three deferred, the pending one scored after all


def test_gate_short_budget_keeps_a_lit_face_over_a_darker_one() -> None:
    darker = (SHARP.astype(np.int16) - 64).astype(np.uint8)  # grey about 96 where SHARP is 160; as sharp
    assert sharpness(darker) == pytest.approx(sharpness(SHARP)) and face_grey(darker) < 0.75 * BRIGHT_GREY
    g = Gate("cam", SelectionConfig(), TokenBucket(TINY_RATE, burst=1))
    assert g.observe(0, 0.0, 9, det(), crops()) is not None  # another track spends the only token
    assert g.observe(1, 0.0, 1, det(score=0.9), crops(darker)) is None
    assert g.observe(2, 0.1, 1, det(score=0.8), crops()) is None
    pending, _ = g.end(1)
    assert pending is not None and pending.frame_index == 2  # scored at the end: the lit one


def test_gate_pending_dropped_when_equal_sent() -> None:
    g = Gate("cam", SelectionConfig(), TokenBucket(TINY_RATE, burst=1))
    assert g.observe(0, 0.0, 1, det(score=0.6), crops()) is not None
    assert g.observe(1, 0.0, 1, det(score=0.6), crops()) is None
    assert g.deferred == 1
    assert g.end(1)[0] is None


def test_gate_pending_cleared_by_a_better_send() -> None:
    g = Gate("cam", SelectionConfig(improve_factor=1.1, refresh_s=0.25), TokenBucket(TINY_RATE, burst=2))
    assert g.observe(0, 0.0, 1, det(score=0.5), crops()) is not None
    assert g.observe(1, 0.0625, 1, det(score=0.54), crops()) is None  # not promising: kept as pending
    assert g.tracks[1].pending is not None
    assert g.observe(2, 0.125, 1, det(score=0.9), crops()) is not None
    assert g.tracks[1].pending is None  # dropped at once, not held (with its crops) until the track ends
    assert g.end(1)[0] is None


def test_gate_scores_every_face_while_the_budget_has_room() -> None:
    bucket = TokenBucket(TINY_RATE, burst=100)
    g = Gate("cam", SelectionConfig(improve_factor=1.1, refresh_s=0.25), bucket)
    sent = [g.observe(i, i / 100, 1, det(score=0.8), crops()) for i in range(50)]
    assert all(c is not None for c in sent) and g.deferred == 0  # 50 tokens taken, 50 left: the reserve
    assert g.observe(50, 0.5, 1, det(score=0.8), crops()) is None  # no better, and the budget runs short
    assert g.observe(51, 0.51, 1, det(score=0.95), crops()) is not None  # promising: takes from the reserve
    assert g.deferred == 1 and bucket.tokens == pytest.approx(49, abs=1e-3)


def test_gate_promising_rule() -> None:
    bucket = TokenBucket(TINY_RATE, burst=100)
    bucket.tokens = 50  # half left: the budget runs short, so only promising faces are scored
    g = Gate("cam", SelectionConfig(improve_factor=1.1, refresh_s=0.25), bucket)
    sent = []
    for i, (pts, score) in enumerate([
        (0.0, 0.6),      # first face: sent
        (0.0625, 0.6),   # no better, too soon: deferred
        (0.0625, 0.65),  # better but not by the factor (0.66): deferred
        (0.125, 0.7),    # beats 0.6 * 1.1: sent
        (0.25, 0.7),     # 0.125 s after the last send: deferred
        (0.375, 0.55),   # refresh_s after the last send, though worse: sent
        (0.5, 0.76),     # sent best is still 0.7 (not the refresh's 0.55), 0.76 < 0.77: deferred
    ]):
        if g.observe(i, pts, 1, det(score=score), crops()) is not None:
            sent.append(i)
    assert sent == [0, 3, 5]
    assert g.deferred == 4
    assert bucket.tokens == pytest.approx(47, abs=1e-3)
    pending, _ = g.end(1)
    assert pending is not None and pending.frame_index == 6  # 0.76 > 0.7 sent: scored at the end


def test_gate_opened_closed() -> None:
    g = Gate("cam", SelectionConfig(), TokenBucket(None))
    g.observe(0, 0.0, 1, det(), crops())
    g.observe(0, 0.0, 2, det(score=0.1), crops())  # gated faces open tracks too
    g.observe(1, 0.1, 1, det(), crops())
    assert (g.opened, g.closed) == (2, 0)
    assert g.end(1)[1] is not None
    assert (g.opened, g.closed) == (2, 1)
    assert g.end(1) == (None, None)
    assert g.end(99) == (None, None)
    assert (g.opened, g.closed) == (2, 1)
    g.observe(2, 0.2, 1, det(), crops())  # the same id after its end is a new track
    assert g.opened == 3


# ---------------------------------------------------------------- TokenBucket


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A settable monotonic clock for agent.pipeline.select: now[0] is the time."""
    now = [100.0]
    monkeypatch.setattr("agent.pipeline.select.time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_token_bucket_burst_then_refill(clock: list[float]) -> None:
    b = TokenBucket(2.0, burst=3)
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    clock[0] += 0.25  # half a token
    assert b.take() is False
    clock[0] += 0.25
    assert [b.take(), b.take()] == [True, False]
    clock[0] += 100.0  # refill is capped at the burst
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    clock[0] += 100.0
    assert [b.take(keep=1.5) for _ in range(3)] == [True, False, False]  # 3 -> 2; 2 - 1 < 1.5
    assert [b.take(), b.take(), b.take()] == [True, True, False]  # the kept ones are there for a plain take


def test_token_bucket_defaults(clock: list[float]) -> None:
    b = TokenBucket(2.0)  # burst defaults to the rate
    assert [b.take() for _ in range(3)] == [True, True, False]
    clock[0] += 1.0
    assert [b.take() for _ in range(3)] == [True, True, False]
    unlimited = TokenBucket(None)
    assert all(unlimited.take() for _ in range(1000))
