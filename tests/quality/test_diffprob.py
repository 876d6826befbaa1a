"""DiffProb shot sets on a real video track (with a spliced-in identity switch) and on LFW face sets."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from agent.common.fr_spec import FACENET
from agent.pipeline.align import align, context_crop
from agent.pipeline.detect import DetectorSpec, make_detector
from agent.pipeline.score import build_scorer
from agent.pipeline.select import Candidate, SelectionConfig, Selector, TrackEnd
from agent.quality.diffprob import EPS, MIN_COS, SWITCH, diffprob, diverse_shots, enrich_factory
from agent.quality.ers import (
    ErsModel,
    balanced_threshold,
    degrade,
    embed,
    face_set,
    largest_face,
    lfw_groups,
    unit_mean,
)


@pytest.fixture(scope="module")
def scorer():
    return build_scorer(FACENET)[0]


@pytest.fixture(scope="module")
def track(shared_dir, scorer):
    """36 frames of the one-person selfie clip (every 3rd), then 3 frames of another person (an LFW photo each):
    a track whose tracker switched identity at the end."""
    detector = make_detector(DetectorSpec())
    cap = cv2.VideoCapture(str(shared_dir / "data/video/inspireface_810_1684206192.mp4"))
    frames = []
    for i in range(108):
        ok, frame = cap.read()
        assert ok
        if i % 3 == 0:
            frames.append((i, frame))
    cap.release()
    lfw = shared_dir / "data/lfw/images/Jennifer_Capriati"
    frames += [(200 + k, cv2.imread(str(lfw / f"Jennifer_Capriati_{k:04d}.jpg"))) for k in (1, 2, 3)]
    cands = []
    for i, frame in frames:
        det = largest_face(frame, detector)
        crop = align(frame, det, FACENET)
        cands.append(Candidate("cam", 1, i, i / 30, det, crop, context_crop(frame, det.bbox), 0.0, 0.0, 0.0, i + 1))
    for c, s in zip(cands, scorer.score([c.crop for c in cands]), strict=True):
        c.scored = s
    # The switched-in photo 201 gets the best quality of the track, so the tests see that a switch is flagged
    # even when it is the frame quality alone would publish.
    top = max(c.scored.quality for c in cands)
    c201 = next(c for c in cands if c.frame_index == 201)
    c201.scored = dataclasses.replace(c201.scored, quality=top + 0.01)
    return sorted(cands, key=lambda c: -c.scored.quality)


def test_diverse_shots_drop_near_duplicate_frames_and_flag_the_switch(track):
    chosen, removed = diverse_shots(track, 5)
    switched = {c.frame_index for c, why in removed if why.startswith(SWITCH)}
    assert switched == {201, 202, 203}  # the LFW photos, although one of them has the best quality of all
    assert track[0].frame_index == 201
    assert chosen[0] is next(c for c in track if c.frame_index < 200)  # the best of the track's own frames
    # The 36 frames of this 3.6 s selfie clip hold 4-5 distinct views by the rule (which it finds depends on the
    # quality order it visits them in: 4 with the 2:4/Bottleneck twin, 5 with 2:4@0.75-1), and asking for every
    # shot gives exactly the frames neither redundant nor switched.
    everything, _ = diverse_shots(track, len(track))
    assert 3 <= len(chosen) <= 5 and chosen == everything[:5]
    assert len(everything) + len(removed) == len(track)
    redundant = [c for c, why in removed if why.startswith("redundant-with frame")]
    assert len(redundant) >= 20  # consecutive frames of a selfie clip repeat each other
    emb = np.stack([c.scored.embedding for c in chosen])
    centre = emb.mean(0) / np.linalg.norm(emb.mean(0))
    prob = (1 + emb @ centre) / 2
    for a in range(len(chosen)):
        for b in range(a):  # no two shots are near-duplicates
            assert emb[a] @ emb[b] < MIN_COS or abs(prob[a] - prob[b]) > EPS / 2


def _mini_ers(shared_dir, scorer) -> ErsModel:
    """An ERS from severely degraded crops of 12 LFW people (a stand-in for `calibrate_ers`)."""
    faces = face_set(lfw_groups(shared_dir / "data/lfw/images", 2, 2)[:12],
                     make_detector(DetectorSpec(input_size=256)), scorer)
    rng = np.random.default_rng(0)
    deg, _ = embed(scorer, [degrade(c, 0.9, rng) for c in faces.crops])
    ers = ErsModel(unit_mean(deg), 0.0, 0.6, 0.4)
    ers.threshold = balanced_threshold(ers.scores(faces.emb), ers.scores(deg))
    return ers


def test_selector_publishes_ers_template_shots_and_suspects(track, shared_dir, scorer):
    ers = _mini_ers(shared_dir, scorer)
    sel = Selector(SelectionConfig(top_k=len(track)), "m", enrich=enrich_factory(ers, 4, "ers"))
    for c in sorted(track, key=lambda c: c.frame_index):
        sel.add(c)
    shot = sel.end(TrackEnd("cam", 1, 0.0, 7.0, 210))
    extra = json.loads(json.dumps(shot.extra))  # plain JSON types only
    assert extra["ers"] == round(ers.score(track[0].scored.embedding), 4) and extra["recognisable"] is True
    # the best shot (frame 201) is itself a suspect: the shots and the template follow the track's majority
    assert shot.frame_index == 201 and extra["identity_switch_suspects"] == [201, 202, 203]
    assert len(extra["shots"]) == 4 and all(s["frame_index"] < 200 for s in extra["shots"])
    assert all(s["ers"] >= ers.threshold for s in extra["shots"])
    tpl = np.array(extra["template"])
    assert extra["template_frames"] == len(track) - 3 and abs(np.linalg.norm(tpl) - 1) < 1e-4
    own = np.stack([c.scored.embedding for c in track if c.frame_index < 200])
    other = np.stack([c.scored.embedding for c in track if c.frame_index >= 200])
    assert (own @ tpl).mean() > 0.8 and (other @ tpl).max() < 0.4  # the switched frames stay out of the template
    # without an ERS: quality-weighted template, no ERS fields; one shot: no shot list
    extra = enrich_factory(None, 1, "ers")(track[0], track)
    assert "ers" not in extra and "shots" not in extra and extra["identity_switch_suspects"] == [201, 202, 203]


def test_diffprob_on_a_face_set_cleans_labels_and_keeps_distinct_photos(shared_dir, scorer):
    """15 photos of one person plus 2 of another filed under the first, and a bank with the other's centre."""
    root = shared_dir / "data/lfw/images"
    groups = [sorted((root / "Donald_Rumsfeld").glob("*.jpg"))[:15], sorted((root / "Jacques_Chirac").glob("*.jpg"))]
    faces = face_set(groups, make_detector(DetectorSpec(input_size=256)), scorer)
    own, other = np.flatnonzero(faces.labels == 0), np.flatnonzero(faces.labels == 1)
    mixed = np.concatenate([own, other[:2]])
    bank = unit_mean(faces.emb[other[2:]])[None]
    r = diffprob(faces.emb[mixed], faces.quality[mixed], bank=bank)
    closer = {x.index for x in r.removed if x.reason == "label" and x.other == 0}
    assert closer == {15, 16}  # the two misfiled photos: nearer the other identity's centre
    # Rumsfeld_0001, a photo FaceNet hardly recognises (cosine ~0.4 to his other photos' centre), is the only
    # other label removal: below the floor, not nearer anyone else
    assert [(x.index, x.other) for x in r.removed if x.reason == "label" and x.index not in closer] in ([], [(0, None)])
    assert len(r.kept) >= 14 and not [x for x in r.removed if x.reason == "redundant"]  # distinct photos all stay
    # The probability rule alone (no embedding agreement) cannot tell distinct photos from copies: it prunes
    # a large part of the same set at the same eps.
    pure = diffprob(faces.emb[mixed], faces.quality[mixed], min_cos=-1.0, bank=bank)
    assert len(pure.kept) <= 10
