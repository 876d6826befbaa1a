"""Degradations, the evaluation drivers on a handful of real LFW pairs and tracks, and tune's MAC counter and
activation criterion on small hand-built graphs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.pipeline.detect import DetectorSpec, RetinaFaceDetector
from agent.pipeline.select import sharpness
from agent.quality import ers_builtin, evaluate
from agent.quality.degrade import KINDS, Degradation, degrade, map_box
from agent.quality.ers import ErsModel
from agent.quality.evaluate import Evaluator, eval_pairs, eval_tracks, lfw_split, pair_faces, pick
from agent.types import Detection
from engines.activation import activation_norms
from engines.prepare import FACENET_RECIPE
from engines.prune import prune
from engines.recipe import Recipe
from engines.twin import count_macs, shared_trunk, twin_cost

BOX = np.array([70, 60, 180, 190], np.float32)


@pytest.fixture(scope="module")
def face(shared_dir) -> np.ndarray:
    return cv2.imread(str(shared_dir / "data/lfw/images/Abdullah_Gul/Abdullah_Gul_0001.jpg"))


def test_degradations_are_deterministic_per_seed(face):
    for kind in KINDS:
        a, ha = degrade(face, Degradation(kind, 0.7, 3), BOX)
        b, hb = degrade(face, Degradation(kind, 0.7, 3), BOX)
        assert np.array_equal(a, b) and np.array_equal(ha, hb), kind
        assert not np.array_equal(a, face), kind
        assert np.array_equal(degrade(face, Degradation(kind, 0.0, 3), BOX)[0], face), kind
    for kind in ("noise", "occlusion", "motion", "pose"):  # the seed drives their random part
        assert not np.array_equal(degrade(face, Degradation(kind, 0.7, 3), BOX)[0],
                                  degrade(face, Degradation(kind, 0.7, 4), BOX)[0]), kind
    with pytest.raises(ValueError):
        degrade(face, Degradation("fog", 0.5, 0))


@pytest.mark.parametrize("kind", ["blur", "motion", "downscale"])
def test_sharpness_falls_with_severity(face, kind):
    values = []
    for s in (0.0, 0.25, 0.5, 0.75, 1.0):
        img, h = degrade(face, Degradation(kind, s, 1), BOX)
        x1, y1, x2, y2 = map_box(h, BOX)
        scale = 112 / (x2 - x1)
        m = np.array([[scale, 0, -x1 * scale], [0, scale, -y1 * scale]], np.float32)
        values.append(sharpness(cv2.warpAffine(img, m, (112, 112))))
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values


def test_geometry_follows_the_degradation(face):
    img, h = degrade(face, Degradation("downscale", 0.5, 0), BOX)
    assert img.shape[:2] == (62, 62) and np.allclose(map_box(h, BOX), BOX * 62 / 250, atol=1e-3)
    _, h = degrade(face, Degradation("pose", 1.0, 0), BOX)
    warped = map_box(h, BOX)
    assert warped[2] - warped[0] < BOX[2] - BOX[0]  # foreshortened


def test_pick_falls_back_to_the_expected_face():
    expected = Detection(BOX.copy(), 0.0, np.zeros((5, 2), np.float32))
    far = Detection(np.array([0, 0, 20, 20], np.float32), 0.9)
    near = Detection(BOX + 5, 0.8)
    assert pick([far, near], expected) is near
    got = pick([far], expected)
    assert got.score == 0.0 and np.array_equal(got.bbox, BOX) and got.landmarks is not None


def test_tuning_split_is_disjoint_from_the_test_pairs(shared_dir):
    pairs, tune = lfw_split(shared_dir / "data/lfw")
    test_people = {x.person for pair in pairs for x in pair}
    assert len(tune) == 65 and not test_people & set(tune)
    assert sum(a.person == b.person for a, b in pairs) == 500 and len(pairs) == 923


def test_eval_pairs_small(shared_dir, tmp_path):
    res = eval_pairs(tmp_path, [FACENET_RECIPE], lfw=shared_dir / "data/lfw", limit=6, seed=1)
    assert json.loads((tmp_path / "pairs.json").read_text())["config"]["pairs"] == 12
    assert "| oracle |" in (tmp_path / "pairs.md").read_text()
    assert (tmp_path / "edc_degraded_facenet_fmr0.001.png").stat().st_size > 10_000
    for models in res["protocols"].values():
        for e in models.values():
            assert e["genuine"] == 6 and e["impostor"] > 100
            curves = e["fmr"]["0.001"]["methods"]
            oracle = np.array(curves["oracle"]["fnmr"])
            for name, c in curves.items():  # nothing discards errors faster than the oracle
                assert np.all(oracle <= np.array(c["fnmr"]) + 1e-9), name
                assert curves["oracle"]["pauc"] <= c["pauc"] + 1e-9, name


def test_eval_tracks_small(shared_dir, tmp_path):
    # the default recipe: its calibrations are the ones the rest of the suite prepares too
    res = eval_tracks(tmp_path, [FACENET_RECIPE], lfw=shared_dir / "data/lfw", video=None, synthetic=6, frames=6,
                      demo=True, natural=5)
    demo = next(v for k, v in res["sets"].items() if k.startswith("demo"))
    assert demo["tracks"] == 4  # the clip's four appearances, each named by its source photo
    assert demo["methods"]["size"]["gain"] > 0.5  # faces grow as they come clean in the demo
    assert demo["methods"]["ERS (built-in)"]["gain"] > 0.5  # full run: 0.884 (docs/QUALITY.md)
    shots = demo["clean_shots"]  # per method, its shot per track and how many the clip's record marks clean
    assert all(len(v["frames"]) == 4 and 0 <= v["clean"] <= 4 for v in shots.values())
    assert shots["oracle"]["clean"] == 4  # the frames most like the source photos lie in the clean stretches
    # the selection score: 2 (frames 71 and 47 are one to three frames beside a clean stretch); PreFIQs alone: 1
    assert shots["selection score (fused)"]["clean"] >= 2 > shots[f"PreFIQs {FACENET_RECIPE}"]["clean"]
    r = res["sets"]["synthetic"]
    assert "ERS (built-in)" in r["methods"] and f"fusion PreFIQs {FACENET_RECIPE} + ERS (built-in)" in r["methods"]
    assert r["tracks"] == 6 and r["frames"] == 36 and (tmp_path / "tracks.png").is_file()
    assert r["methods"]["oracle"]["gain"] == 1.0 and r["methods"]["oracle"]["regret"] == 0.0
    for name, m in r["methods"].items():
        assert m["utility"] <= r["oracle_utility"] + 1e-9, name
    assert r["methods"][f"PreFIQs {FACENET_RECIPE}"]["spearman"] > 0.2  # quality follows utility within tracks
    nat = res["sets"]["natural"]  # people's own photos: 5 test-split people with 4+, up to 6 frames each
    assert nat["tracks"] == 5 and nat["methods"]["oracle"]["gain"] == 1.0
    lfw = shared_dir / "data/lfw"
    assert not set(nat["labels"]) & set(lfw_split(lfw)[1])  # never a tuning person
    # the first photo enrols, the next six (at most) are the frames
    assert nat["frames"] == sum(min(len(evaluate.person_images(lfw, p)) - 1, 6) for p in nat["labels"])


def test_eval_reuses_the_saved_builtin_ers_and_never_an_lfw_calibration(shared_dir, monkeypatch):
    ev = Evaluator(shared_dir / "data/lfw")
    scorer = evaluate.Scorer(ev.spec, ev.trunk(FACENET_RECIPE), 8)
    saved = ers_builtin.ensure_ers(scorer, ev.prepared(FACENET_RECIPE), DetectorSpec())  # what the agent saves

    def no_build(*_):
        raise AssertionError("built again")

    monkeypatch.setattr(evaluate, "builtin_ers", no_build)
    monkeypatch.setattr(ers_builtin, "builtin_ers", no_build)
    assert ev.ers(FACENET_RECIPE).uic.tolist() == saved.uic.tolist() and saved.info["source"] == "builtin"
    # a calibration on LFW saved there instead has seen the evaluation's faces: a built-in one is built
    ev._ers = None
    lfw = ErsModel(saved.uic, 1.0, 0.5, 0.2, {"source": "lfw"})
    fresh = ErsModel(-saved.uic, 1.1, None, None, {"source": "builtin"})
    monkeypatch.setattr(evaluate, "load_ers", lambda prepared: lfw)
    monkeypatch.setattr(evaluate, "builtin_ers", lambda scorer, det: fresh)
    assert ev.ers(FACENET_RECIPE) is fresh
    # a built-in one that another detector built is built again for this run's (and saved), as the agent does
    ev._ers = None
    other = ErsModel(saved.uic, 1.0, None, None, {"source": "builtin", "built": {"detector": "retinaface"}})
    saves = []
    for module in (evaluate, ers_builtin):
        monkeypatch.setattr(module, "load_ers", lambda prepared: other)
    monkeypatch.setattr(ers_builtin, "builtin_ers", lambda scorer, det: fresh)
    monkeypatch.setattr(ers_builtin, "save_ers", lambda prepared, model, builtin: saves.append(model) or prepared.dir)
    assert ev.ers(FACENET_RECIPE) is fresh and saves == [fresh]


def test_eval_and_tune_run_the_detector_they_are_given(shared_dir):
    """`eval|tune --detector retinaface`: the LFW stills go through it (the clips, the calibration material and the
    built-in ERS take `ev.det`). Built calibrations are left alone here: the rest of the suite shares them."""
    from agent.cli.main import _eval_detector, build_parser

    for argv in (["eval", "pairs"], ["eval", "tracks"], ["tune"], ["tune", "--selection"]):
        args = build_parser().parse_args([*argv, "--detector", "retinaface"])
        assert _eval_detector(args) == DetectorSpec(kind="retinaface"), argv
    ev = Evaluator(shared_dir / "data/lfw", detector=DetectorSpec(kind="retinaface"))
    assert isinstance(ev.detector, RetinaFaceDetector) and ev.detector.spec.input_size == 256
    assert ev.det.kind == "retinaface" and ev.det.input_size == 640
    pairs = lfw_split(shared_dir / "data/lfw")[0][:3]
    faces, _ = pair_faces(ev, pairs, seed=1)
    clean = {im.key for pair in pairs for im in pair}
    assert len(faces) == len(clean) + len(pairs)  # the pairs' clean images and each pair's degraded probe
    detected = dict(zip(faces.keys, faces.cheap["detector"], strict=True))
    assert all(detected[k] > 0.9 for k in clean), detected  # RetinaFace's confidence on clean LFW faces


def _tiny_model() -> onnx.ModelProto:
    """x [N,4,8,8] -> Relu -> Conv 8x4x3x3 (pad 1) -> flatten -> MatMul [512, 16]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "w_conv"),
             numpy_helper.from_array(rng.normal(size=(512, 16)).astype(np.float32), "w_fc"),
             numpy_helper.from_array(np.array([0, 512], np.int64), "shape")]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w_conv"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w_fc"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_mac_counter_and_twin_cost_by_hand():
    model = _tiny_model()
    assert count_macs(model) == {"conv": 8 * 8 * 8 * 4 * 3 * 3, "fc": 512 * 16}
    pruned = prune(model, Recipe.parse("2:4@0.5-1")).model  # the deeper of the two layers: fc
    frac, sparse = twin_cost(shared_trunk(model, pruned, "y_twin"), True)
    assert frac == pytest.approx(8192 / (18432 + 8192)) and sparse == pytest.approx(frac / 2)


def test_activation_criterion_prunes_dead_channels_first():
    model = _tiny_model()
    x = np.random.default_rng(1).normal(size=(6, 4, 8, 8)).astype(np.float32)
    x[:, 0] = -np.abs(x[:, 0])  # channel 0 never passes the Relu
    norms = activation_norms(model, [x[:3], x[3:]])
    assert np.allclose(norms["w_conv"], np.sqrt((np.maximum(x, 0) ** 2).mean(axis=(0, 2, 3))), rtol=1e-5)
    assert norms["w_conv"][0] == 0 and norms["w_fc"].shape == (512,)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[:, 0] = 100.0  # the dead channel holds the largest weights: magnitude keeps them, activation drops them
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w_conv"))
    by = {}
    for text in ("2:4/conv", "2:4/conv+act"):
        out = prune(model, Recipe.parse(text), norms).model
        by[text] = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w_conv"))
    assert np.all(by["2:4/conv"][:, 0] == 100.0) and np.all(by["2:4/conv+act"][:, 0] == 0.0)
