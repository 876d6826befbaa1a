"""The selection score (agent/quality/selection.py) on the real default models and real LFW faces."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from scipy.stats import spearmanr

from agent.backends.pairs import build_pair
from agent.common.fr_spec import FACENET, preprocess
from agent.pipeline.align import align
from agent.pipeline.detect import DetectorSpec, make_detector
from agent.pipeline.score import Scorer, build_scorer, face_brightness, l2n
from agent.quality.degrade import Degradation
from agent.quality.ers_builtin import CalibrationFaces
from agent.quality.evaluate import degrade_face
from agent.quality.selection import (
    STATS_CUES,
    WEIGHTS,
    SelectionCalibration,
    ensure_selection,
    fit_probability,
    fit_weights,
    raw_cues,
    same_ers,
    selection_path,
    with_selection,
)
from engines.prepare import prepare_fr
from engines.twin import stat_tensors

KINDS = ("blur", "downscale", "noise", "lowlight", "jpeg", "occlusion", "motion")


@pytest.fixture(scope="module")
def faces(shared_dir):
    """(person, image, detection) for images 1 and 2 of 40 LFW people (the first 40 with 2+ images)."""
    detector = make_detector(DetectorSpec())
    root = shared_dir / "data/lfw/images"
    people = sorted(p for p in root.iterdir() if len(list(p.iterdir())) >= 2)[:40]
    out = {}
    for p in people:
        for i in (1, 2):
            img = cv2.imread(str(p / f"{p.name}_{i:04d}.jpg"))
            d = min(detector.detect(img), key=lambda d: np.linalg.norm((d.bbox[:2] + d.bbox[2:]) / 2 - 125))
            out[(p.name, i)] = (img, d)
    return out


@pytest.fixture(scope="module")
def fused():
    scorer, prepared = build_scorer(FACENET)
    with_selection(scorer, prepared, DetectorSpec())
    return scorer


def degraded_crop(img: np.ndarray, det, kind: str, severity: float, seed: int) -> np.ndarray:
    """The aligned crop of the face after a degradation (the detection mapped through its geometry)."""
    return align(*degrade_face(img, det, [Degradation(kind, severity, seed)]), FACENET)


def test_pair_graph_reports_the_activation_statistics(faces):
    """The pair's stats outputs are the spatial mean and mean square of the tensors named by stat_tensors (for
    FaceNet the outputs of Conv2d_4b_3x3 and Mixed_6a), equal to those tensors reduced by numpy."""
    prepared = prepare_fr(FACENET)
    pair = onnx.load(str(prepared.pair))
    tensors = stat_tensors(pair)
    assert tensors == ["InceptionResnetV1/Conv2d_4b_3x3/Relu", "InceptionResnetV1/Mixed_6a/concat"]
    assert prepared.manifest["activation_stats"] == [0.05, 0.34]
    crops = [align(img, d, FACENET) for img, d in list(faces.values())[:6]]
    batch = preprocess(crops, FACENET)
    f = build_pair(prepared, "trunk", backend="onnxruntime").forward(batch)
    assert sorted(f.stats) == ["stats/0/mean", "stats/0/meansq", "stats/1/mean", "stats/1/meansq"]
    dense = onnx.load(str(prepared.dense))
    dense.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    sess = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"])
    maps = sess.run(tensors, {sess.get_inputs()[0].name: batch})
    for i, m in enumerate(maps):
        np.testing.assert_allclose(f.stats[f"stats/{i}/mean"], m.mean((2, 3)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f.stats[f"stats/{i}/meansq"], (m**2).mean((2, 3)), rtol=1e-4, atol=1e-5)


def test_quality_is_a_probability_with_every_cue_reported(fused, faces):
    crops = [align(img, d, FACENET) for img, d in list(faces.values())[:8]]
    for s, b in zip(fused.score(crops, [0.9] * len(crops), [150.0] * len(crops)), face_brightness(crops), strict=True):
        assert 0.0 <= s.quality <= 1.0
        assert s.prefiqs == pytest.approx(1.0 - s.drift / 2.0)
        assert set(s.cues) == set(WEIGHTS)
        assert s.cues["detector"] == pytest.approx(0.9)
        assert s.cues["size"] == 150.0 and s.cues["brightness"] == pytest.approx(b)


def test_darker_or_smaller_faces_lose_brighter_or_larger_ones_do_not(fused, faces):
    """The brightness and size cues are hinged: a face darker than the clean calibration faces, or smaller than
    100 px, loses; a brighter or larger one gains nothing (a lamp or a close-up is not a better face)."""
    crop = align(*faces[next(iter(faces))], FACENET)
    lit = [np.clip(crop.astype(np.float32) * 1.3 + b, 0, 255).astype(np.uint8) for b in (20, 60)]
    dark = (crop * 0.3).astype(np.uint8)
    # measured: this face -0.18 (a little darker than the packaged faces), 0.3x its brightness -3.35
    z = fused.selection.scale({"brightness": face_brightness([*lit, crop, dark])})["brightness"]
    assert z[0] == 0.0 and z[1] == 0.0 and z[3] < z[2] - 1.0 < -1.0
    q = [s.quality for s in fused.score([crop] * 4, [0.9] * 4, [400.0, 100.0, 50.0, float("nan")])]
    assert q[0] == pytest.approx(q[1], abs=1e-9) and q[3] == pytest.approx(q[0], abs=1e-9)  # unknown: neutral
    assert q[2] < q[1] - 0.01


# Measured on these 40 people at severity 0.8 (the detection kept, so the detector cue cannot help): the fused quality
# fell for at least 34 of 40 faces under every kind but JPEG, where it fell for 12: strong JPEG smooths the face, and
# PreFIQs and the activation cues read that as cleaner (only ERS falls, for 38 of 40). A known blind spot
# (docs/QUALITY.md), kept visible: the strict xfail fails the day JPEG passes, so this line gets revisited.
@pytest.mark.parametrize("kind", [*(k for k in KINDS if k != "jpeg"), pytest.param(
    "jpeg", marks=pytest.mark.xfail(strict=True, reason="JPEG is a blind spot of the fused score"))])
def test_quality_falls_under_every_degradation(fused, faces, kind):
    falls, n = 0, 0
    for k, (img, d) in faces.items():
        if k[1] != 1:
            continue
        clean, bad = fused.score([align(img, d, FACENET), degraded_crop(img, d, kind, 0.8, n)])
        falls += bad.quality < clean.quality
        n += 1
    # a sign test: under "no effect" 34 or more of 40 falls has probability < 1e-5
    assert falls >= 34, f"{kind}: quality fell for {falls} of {n} faces"


def test_fused_quality_tracks_utility_better_than_prefiqs(fused, faces):
    """Utility of a degraded copy of image 1 = its dense similarity to the person's clean image 2; the fused score
    ranks the copies of each person (a track) by utility better than PreFIQs."""
    rho_fused, rho_prefiqs = [], []
    rng = np.random.default_rng(0)
    for name in sorted({k[0] for k in faces}):
        ref = fused.score([align(*faces[(name, 2)], FACENET)])[0].embedding
        img, d = faces[(name, 1)]
        crops = [align(img, d, FACENET)] + [
            degraded_crop(img, d, str(rng.choice(KINDS)), float(rng.uniform(0, 1)), int(rng.integers(1 << 30)))
            for _ in range(9)]
        scored = fused.score(crops)
        utility = [float(s.embedding @ ref) for s in scored]
        rho_fused.append(spearmanr([s.quality for s in scored], utility).statistic)
        rho_prefiqs.append(spearmanr([s.prefiqs for s in scored], utility).statistic)
    fused_rho, prefiqs_rho = float(np.mean(rho_fused)), float(np.mean(rho_prefiqs))
    print(f"mean within-person Spearman: fused {fused_rho:.3f}, PreFIQs {prefiqs_rho:.3f}")
    assert fused_rho >= 0.6
    assert fused_rho >= prefiqs_rho + 0.1


def test_calibration_is_built_once_and_saved(tmp_path, faces):
    prepared = prepare_fr(FACENET, root=tmp_path)
    scorer = Scorer(FACENET, build_pair(prepared, "trunk", backend="onnxruntime"))
    from agent.quality.ers_builtin import ensure_ers

    ers = ensure_ers(scorer, prepared, DetectorSpec())
    calls = []
    crops = [align(img, d, FACENET) for img, d in list(faces.values())[:20]]

    light = [cv2.GaussianBlur(c, (0, 0), 1.5) for c in crops[10:15]]

    def material(s):
        calls.append(1)
        return CalibrationFaces(crops[:10], light, [cv2.GaussianBlur(c, (0, 0), 6) for c in crops[10:]])

    first = ensure_selection(scorer, prepared, ers, "fused", material, "centerface")
    saved = json.loads(selection_path(prepared).read_text())
    assert set(saved["reference"]) == {"0/mean", "0/std", "1/mean", "1/std"} and saved["detector"] == "centerface"
    second = ensure_selection(scorer, prepared, ers, "fused", material, "centerface")
    assert calls == [1]
    # another detector's crops: built again, and saved for it
    ensure_selection(scorer, prepared, ers, "fused", material, "retinaface")
    assert calls == [1, 1] and json.loads(selection_path(prepared).read_text())["detector"] == "retinaface"
    # another ERS (`bestshot ers calibrate` run since, or another precision's): the ERS cue's medians are built again
    other = dataclasses.replace(ers, uic=-ers.uic)
    ensure_selection(scorer, prepared, other, "fused", material, "retinaface")
    ensure_selection(scorer, prepared, other, "fused", material, "retinaface")
    assert calls == [1, 1, 1] and same_ers(json.loads(selection_path(prepared).read_text()), other)
    # the same ERS saved and read back (its centre rounded to 7 decimals, renormalised): not built again
    reread = dataclasses.replace(other, uic=l2n(np.round(other.uic, 7).astype(np.float32)[None])[0])
    ensure_selection(scorer, prepared, reread, "fused", material, "retinaface")
    assert calls == [1, 1, 1]
    ev = scorer.evidence(crops[:5])
    np.testing.assert_allclose(first(ev)[0], second(ev)[0], rtol=1e-6)
    # on its own calibration, clean faces sit at 0 and degraded ones at -1 of every cue's scale
    cues = first.scale({k: np.array([first.calibration.clean[k], first.calibration.degraded[k]])
                        for k in first.calibration.clean})
    for k, v in cues.items():
        np.testing.assert_allclose(v, [0.0, -1.0], atol=1e-9, err_msg=k)
    # the activation cues' clean reference is the geometric set; the other cues' clean median the light variants'
    reference = first.calibration.reference
    geo, rec = (first.scale(raw_cues(scorer.evidence(c), ers, reference)) for c in (crops[:10], light))
    for k in STATS_CUES:
        assert abs(np.median(geo[k])) < 1e-6 and np.median(rec[k]) < -0.05, k
    assert abs(np.median(rec["prefiqs"])) < 1e-6 and abs(np.median(rec["ers"])) < 1e-6
    assert ensure_selection(scorer, prepared, ers, "prefiqs", material, "centerface") is None
    with pytest.raises(ValueError, match="unknown selection"):
        ensure_selection(scorer, prepared, ers, "best", material, "centerface")
    assert SelectionCalibration.from_json(saved).clean == first.calibration.clean


def test_without_activation_statistics_the_no_stats_weights_apply(faces):
    """The separate form (and TensorRT) reports no statistics: the score uses the fit without them."""
    scorer, prepared = build_scorer(FACENET, form="separate")
    with_selection(scorer, prepared, DetectorSpec())
    crops = [align(img, d, FACENET) for img, d in list(faces.values())[:4]]
    for s in scorer.score(crops):
        assert 0.0 <= s.quality <= 1.0
        assert not set(STATS_CUES) & set(s.cues)


def test_fit_weights_and_probability_recover_a_known_model():
    rng = np.random.default_rng(0)
    w_true = np.array([1.0, 0.5, 0.0, 2.0])
    z = rng.normal(size=(400, 4))
    utility = z @ w_true + rng.normal(0, 0.3, 400)
    tracks = [np.arange(i, i + 10) for i in range(0, 400, 10)]
    w = fit_weights(z, tracks, utility, l2=0.0)
    assert float(w @ w_true / np.linalg.norm(w) / np.linalg.norm(w_true)) > 0.98
    s = rng.normal(size=4000)
    matched = rng.random(4000) < 1 / (1 + np.exp(-(2.0 * s - 1.0)))
    slope, icpt = fit_probability(s, matched)
    assert slope == pytest.approx(2.0, abs=0.25)
    assert icpt == pytest.approx(-1.0, abs=0.2)
