"""ERS calibrated on real data (LFW, detector false positives on the shared videos), checked on held-out
identities; the built-in calibration (packaged images only) against it; track templates against single frames on
LFW pseudo-tracks."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from agent.common.fr_spec import FACENET
from agent.pipeline.detect import DetectorSpec, make_detector
from agent.pipeline.score import build_scorer
from agent.pipeline.select import Candidate
from agent.quality.ers import (
    ErsModel,
    calibrate_ers,
    captured_embeddings,
    degrade,
    embed,
    evaluate_templates,
    face_set,
    largest_cluster,
    lfw_groups,
    load_ers,
    save_ers,
    template,
    template_of,
)
from agent.quality.ers_builtin import builtin_ers, ensure_ers
from agent.types import Detection


@pytest.fixture(scope="module")
def setup(shared_dir, tmp_path_factory):
    scorer, prepared = build_scorer(FACENET)
    groups = lfw_groups(shared_dir / "data/lfw/images", 2, 3)
    stills = make_detector(DetectorSpec(input_size=256))
    # "captured" crops, saved as `bestshot subscribe --out` does: clean faces of 15 tuning-side people beyond
    # those calibrated, and degraded copies of them
    extra = face_set(groups[0::2][25:40], stills, scorer)
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("captured")
    for i, c in enumerate(extra.crops):
        cv2.imwrite(str(folder / f"{i}_1_face.jpg"), c)
        cv2.imwrite(str(folder / f"{i}_2_face.jpg"), degrade(c, rng.uniform(0.7, 1.0), rng))
        cv2.imwrite(str(folder / f"{i}_1_context.jpg"), c[:40])  # not a face crop: ignored
    captured = captured_embeddings(folder, scorer)
    assert len(captured) == 2 * len(extra.crops)
    model = calibrate_ers(scorer, DetectorSpec(), shared_dir, per_person=3, max_people=25, captured=captured,
                          fp_every=50)
    held_out = face_set(groups[1::2][25:40], stills, scorer)  # test-side people the calibration never saw
    return scorer, prepared, model, held_out, len(extra.emb)


def test_uic_separates_recognisable_from_unrecognisable_on_held_out_identities(setup):
    _, _, model, _, _ = setup
    test = model.info["separation"]["test"]
    assert test["auc"] >= 0.97 and test["auc_degraded"] >= 0.97 and test["auc_false_positives"] >= 0.95
    assert test["recognisable_kept"] >= 0.9 and test["unrecognisable_rejected"] >= 0.9
    assert test["ers_mean_recognisable"] > test["ers_mean_degraded"] + 0.3
    counts = model.info["counts"]
    assert counts["test_false_positives"] > 20 and counts["tune_degraded_unmatched"] > 40
    assert 0.3 < model.match_threshold < 0.9 and 0.0 < model.identity_floor < model.match_threshold
    floor = model.info["separation"]["test_identity_floor"]
    assert floor["genuine_below"] <= 0.05 and floor["impostor_below"] >= 0.8


def test_ers_falls_with_degradation(setup):
    scorer, _, model, held_out, _ = setup
    rng = np.random.default_rng(1)
    clean = model.scores(held_out.emb)
    ladder = [model.scores(embed(scorer, [degrade(c, s, rng) for c in held_out.crops])[0]) for s in (0.3, 0.6, 0.9)]
    assert (ladder[-1] < clean).mean() >= 0.9  # heavily degraded crops score lower for a large majority
    means = [clean.mean()] + [x.mean() for x in ladder]
    assert all(a > b for a, b in zip(means, means[1:], strict=False)), means
    bands = model.info["separation"]["test_by_severity"]
    ers_means = [b["ers_mean"] for b in bands["bands"]]
    assert ers_means[0] > ers_means[-1] + 0.3 and bands["auc_ers_predicts_match"] >= 0.8


def test_largest_cluster_of_captured_crops_is_the_unrecognisable_one(setup):
    scorer, _, model, held_out, n_clean = setup
    assert model.info["counts"]["captured_cluster"] >= 5
    rng = np.random.default_rng(2)
    deg, _ = embed(scorer, [degrade(c, 0.9, rng) for c in held_out.crops[::2]])
    mixed = np.concatenate([held_out.emb, deg])
    members = largest_cluster(mixed, 1.0 - model.match_threshold)
    assert len(members) >= 5 and (members >= len(held_out.emb)).mean() >= 0.9


def test_save_and_load_beside_the_model(setup, tmp_path):
    _, prepared, model, _, _ = setup
    mine = dataclasses.replace(prepared, dir=tmp_path / "fr" / "recipe")
    mine.dir.mkdir(parents=True)
    assert load_ers(mine) is None
    path = save_ers(mine, model)
    assert path == tmp_path / "fr" / "ers.json"
    back = load_ers(mine)
    assert back is not None and np.allclose(back.uic, model.uic, atol=1e-6) and back.threshold == model.threshold
    assert back.info["counts"] == model.info["counts"]
    other = dataclasses.replace(mine, manifest={**mine.manifest, "dense_sha256": "0" * 64})
    assert load_ers(other) is None  # calibrated for another dense model


def test_templates_beat_the_best_single_frame(setup, shared_dir):
    scorer, _, model, held_out, _ = setup
    res = evaluate_templates(scorer, DetectorSpec(), shared_dir, model, max_people=30, draws=2)
    m = res["methods"]
    assert res["counts"]["genuine"] >= 50
    # TAR at FMR 1e-2 (about 17 impostors may match at this size) is stable here; at FMR 1e-3 it would rest on one
    # or two, so those figures come from the full run (docs/QUALITY.md). The full run: template 0.955 against 0.885
    # for the best frame by quality; their AUCs are too close (0.987 vs 0.986) to order on 30 people.
    assert m["template_ers"]["tar_at_fmr_1e-2"] > m["best_frame_quality"]["tar_at_fmr_1e-2"]
    assert m["template_ers"]["auc"] >= m["mean"]["auc"] and m["template_quality"]["auc"] >= m["mean"]["auc"]
    # the photos as they are (`eval templates --degraded 0`): one draw, as nothing random is left; the full run (81
    # people) verifies the ERS template at FMR 1e-3 for 93.8 % and the best shot for 84.0 % (docs/QUALITY.md)
    nat = evaluate_templates(scorer, DetectorSpec(), shared_dir, model, max_people=30, p_degraded=0.0)
    assert nat["counts"]["tracks"] == nat["counts"]["people"] == 30 and "p=0.0" in nat["protocol"]
    assert all(v["tar_at_fmr_1e-2"] >= 0.9 for v in nat["methods"].values()), nat["methods"]
    # the Candidate form equals the array form; unknown weights are refused
    det = Detection(np.zeros(4, np.float32), 1.0)
    scored = scorer.score(held_out.crops[:4])
    kept = [Candidate("c", 1, i, 0.0, det, held_out.crops[i], held_out.crops[i], 0.0, 0.0, 0.0, 1, s)
            for i, s in enumerate(scored)]
    emb, q = np.stack([s.embedding for s in scored]), np.array([s.quality for s in scored])
    assert np.allclose(template(kept, "ers", model), template_of(emb, q, "ers", model))
    with pytest.raises(ValueError, match="calibrated ERS"):
        template(kept, "ers")
    with pytest.raises(ValueError, match="unknown"):
        template(kept, "median")


@pytest.fixture(scope="module")
def builtin(setup):
    return builtin_ers(setup[0], DetectorSpec())


def test_builtin_ers_separates_held_out_lfw_faces(setup, builtin):
    """Built from the packages' three face photos and their non-face images only, it must sort held-out LFW faces
    from their severely degraded copies and from LFW's false positives as the LFW calibration does."""
    scorer, _, lfw, held_out, _ = setup
    assert builtin.info["source"] == "builtin" and builtin.match_threshold is None and builtin.identity_floor is None
    assert float(builtin.uic @ lfw.uic) >= 0.9  # the same direction in embedding space
    rng = np.random.default_rng(3)
    deg_emb = embed(scorer, [degrade(c, rng.uniform(0.8, 1.0), rng) for c in held_out.crops])[0]
    clean, degraded = builtin.scores(held_out.emb), builtin.scores(deg_emb)
    assert (clean >= builtin.threshold).mean() >= 0.9 and (degraded < builtin.threshold).mean() >= 0.9
    mild = embed(scorer, [degrade(c, rng.uniform(0.0, 1.0), rng) for c in held_out.crops])[0]
    both = np.concatenate([held_out.emb, deg_emb, mild])  # both calibrations order the faces nearly alike
    assert np.corrcoef(builtin.scores(both), lfw.scores(both))[0, 1] >= 0.95


def test_ensure_ers_builds_once_and_yields_to_a_calibration(setup, builtin, tmp_path):
    scorer, prepared, lfw, _, _ = setup
    mine = dataclasses.replace(prepared, dir=tmp_path / "fr" / "recipe")
    mine.dir.mkdir(parents=True)
    first = ensure_ers(scorer, mine, DetectorSpec())  # nothing saved: built now, saved
    assert first.info["source"] == "builtin" and np.allclose(first.uic, builtin.uic, atol=1e-5)
    saved = (tmp_path / "fr" / "ers.json").stat().st_mtime_ns
    again = ensure_ers(scorer, mine, DetectorSpec())
    assert (tmp_path / "fr" / "ers.json").stat().st_mtime_ns == saved and again.threshold == first.threshold
    save_ers(mine, lfw)  # `bestshot ers calibrate` replaces it
    assert ensure_ers(scorer, mine, DetectorSpec()).info["source"] == "lfw"
    assert ensure_ers(scorer, mine, DetectorSpec(kind="retinaface")).info["source"] == "lfw"  # whatever the detector


def test_ensure_ers_keeps_a_built_in_one_per_precision(setup, tmp_path, monkeypatch):
    """INT8 moves the embeddings (the built-in ERS centres of the two graphs: cosine 0.992), so each precision builds
    and keeps its own; neither replaces the other's, and an LFW calibration serves both."""
    import agent.quality.ers_builtin

    scorer, prepared, lfw, _, _ = setup
    fp32 = dataclasses.replace(prepared, dir=tmp_path / "fr" / "recipe")
    int8 = dataclasses.replace(prepared, dir=tmp_path / "fr" / "recipe-int8",
                               manifest={**prepared.manifest, "precision": "int8"})
    fp32.dir.mkdir(parents=True)
    int8.dir.mkdir(parents=True)
    built: list[ErsModel] = []

    def build(scorer, det):  # the graph's own built-in ERS, told apart by its threshold
        built.append(ErsModel(lfw.uic, 1.0 + len(built), None, None, {"source": "builtin",
                                                                        "built": {"detector": det.kind}}))
        return built[-1]

    monkeypatch.setattr(agent.quality.ers_builtin, "builtin_ers", build)
    assert ensure_ers(scorer, int8, DetectorSpec()).threshold == 1.0  # INT8 first, with nothing beside the model
    assert ensure_ers(scorer, int8, DetectorSpec()).threshold == 1.0 and len(built) == 1  # read back
    assert ensure_ers(scorer, fp32, DetectorSpec()).threshold == 2.0
    assert (tmp_path / "fr" / "ers.json").is_file() and (tmp_path / "fr" / "recipe-int8" / "ers.json").is_file()
    assert ensure_ers(scorer, fp32, DetectorSpec()).threshold == 2.0 and len(built) == 2
    assert ensure_ers(scorer, int8, DetectorSpec()).info["built"] == {"detector": "centerface", "precision": "int8"}
    assert len(built) == 2  # each read back, none built again
    # a cache from before precisions were told apart: its built-in ERS, of an unknown graph, is built again
    old = json.loads((tmp_path / "fr" / "ers.json").read_text())
    del old["built"]["precision"]
    (tmp_path / "fr" / "ers.json").write_text(json.dumps(old))
    assert ensure_ers(scorer, fp32, DetectorSpec()).threshold == 3.0
    save_ers(fp32, lfw)  # `bestshot ers calibrate`
    assert ensure_ers(scorer, int8, DetectorSpec()).info["source"] == "lfw"


def test_ensure_ers_without_a_usable_detector_runs_on_without_ers(setup, tmp_path, monkeypatch, caplog):
    """A detector that finds no face in the packaged photos: one error naming the cause, no ERS, nothing saved."""
    import agent.quality.ers_builtin

    scorer, prepared, _, _, _ = setup
    mine = dataclasses.replace(prepared, dir=tmp_path / "fr" / "recipe")
    mine.dir.mkdir(parents=True)
    monkeypatch.setattr(agent.quality.ers_builtin, "face_photos", lambda: [np.full((300, 300, 3), 128, np.uint8)])
    assert ensure_ers(scorer, mine, DetectorSpec()) is None
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "finds no face" in errors[0] and "centerface" in errors[0]
    assert not (tmp_path / "fr" / "ers.json").exists()
