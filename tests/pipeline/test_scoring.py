"""PreFIQs scoring on the real default models and real LFW faces."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from scipy.stats import binomtest, spearmanr

from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.backends.pairs import build_pair
from agent.common.fr_spec import FACENET, preprocess
from agent.pipeline.align import align
from agent.pipeline.detect import DetectorSpec, make_detector
from agent.pipeline.score import build_scorer, l2n
from agent.quality.selection import with_selection
from engines.prepare import GENERIC_RECIPE, prepare_fr
from engines.prune import is_24, prunable_layers


@pytest.fixture(scope="module")
def detector():
    return make_detector(DetectorSpec())


@pytest.fixture(scope="module")
def lfw_faces(shared_dir, detector):
    """(person, image, detection) for the first image of 40 people with at least 2 images."""
    root = shared_dir / "data/lfw/images"
    people = sorted(p for p in root.iterdir() if len(list(p.iterdir())) >= 2)[:40]
    out = []
    for p in people:
        for i in (1, 2):
            img = cv2.imread(str(p / f"{p.name}_{i:04d}.jpg"))
            dets = detector.detect(img)
            assert dets, f"no face found in {p.name}_{i}"
            centre = np.array([125, 125])
            d = min(dets, key=lambda d: np.linalg.norm((d.bbox[:2] + d.bbox[2:]) / 2 - centre))
            out.append((p.name, i, img, d))
    return out


def test_shared_trunk_equals_separate_models(lfw_faces):
    prepared = prepare_fr(FACENET)
    crops = [align(img, d, FACENET) for _, _, img, d in lfw_faces[:24]]
    batch = preprocess(crops, FACENET)
    d1, t1 = build_pair(prepared, "trunk").embed(batch)
    d2, t2 = build_pair(prepared, "separate").embed(batch)
    cos_d = (l2n(d1) * l2n(d2)).sum(1)
    cos_t = (l2n(t1) * l2n(t2)).sum(1)
    assert cos_d.min() >= 0.9999 and cos_t.min() >= 0.9999
    # ... and the twin really differs from the dense model
    assert (l2n(d1) * l2n(t1)).sum(1).max() < 0.9999


def test_saved_twin_is_exactly_24_and_the_rest_bit_identical():
    prepared = prepare_fr(FACENET)
    dense = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(prepared.dense)).graph.initializer}
    twin_model = onnx.load(str(prepared.twin))
    twin = {t.name: numpy_helper.to_array(t) for t in twin_model.graph.initializer}
    axes = {p.weight: p.axis for p in prunable_layers(twin_model)}
    pruned = prepared.manifest["sparsity"]
    assert len(pruned) == prepared.manifest["layers_pruned"] >= 1
    assert prepared.manifest["pattern_2_4_verified"] is True
    for name, w in twin.items():
        if name in pruned:
            assert is_24(w, axes[name]), name
            assert abs((w == 0).mean() - 0.5) < 0.01
            kept = w != 0
            assert np.array_equal(w[kept], dense[name][kept])
        else:
            assert w.tobytes() == dense[name].tobytes(), name


def test_prepare_twice_reuses_the_cache():
    a = prepare_fr(FACENET)
    mtime = a.twin.stat().st_mtime_ns
    b = prepare_fr(FACENET)
    assert b.twin == a.twin and b.twin.stat().st_mtime_ns == mtime
    assert b.manifest["source_sha256"] == a.manifest["source_sha256"]


def _pairs(shared_dir):
    lines = (shared_dir / "data/lfw/pairsDevTest.txt").read_text().split("\n")[1:]
    for ln in lines:
        p = ln.split()
        if len(p) == 3:
            yield (p[0], int(p[1])), (p[0], int(p[2])), 1
        elif len(p) == 4:
            yield (p[0], int(p[1])), (p[2], int(p[3])), 0


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 35 s here; 600 s ran out once (at 640 px) on 2 cores at load average 20
def test_lfw_devtest_verification_accuracy(shared_dir):
    """The dense model through our own detection and crop, 10-fold threshold, every third of the 1,000 pairs
    (all 1,000 gave 0.964: docs/QUALITY.md). The detector runs at the stills' own size (250 px), as the other
    LFW still tests do, not upscaled to 640 (six times the pixels for the same faces)."""
    detector = make_detector(DetectorSpec(input_size=256))
    pairs = list(_pairs(shared_dir))
    assert len(pairs) == 1000
    pairs = pairs[::3]
    keys = sorted({a for a, _, _ in pairs} | {b for _, b, _ in pairs})
    backend = OnnxRuntimeBackend(prepare_fr(FACENET).dense)
    crops = []
    for name, i in keys:
        img = cv2.imread(str(shared_dir / "data/lfw/images" / name / f"{name}_{i:04d}.jpg"))
        dets = detector.detect(img)
        centre = np.array([125, 125])
        d = min(dets, key=lambda d: np.linalg.norm((d.bbox[:2] + d.bbox[2:]) / 2 - centre))
        crops.append(align(img, d, FACENET))
    emb = np.concatenate([backend.run(preprocess(crops[i : i + 32], FACENET))["embedding"]
                          for i in range(0, len(crops), 32)])
    e = dict(zip(keys, l2n(emb), strict=True))
    s = np.array([float(e[a] @ e[b]) for a, b, _ in pairs])
    y = np.array([lab for _, _, lab in pairs])
    idx = np.random.default_rng(0).permutation(len(s))
    accs = []
    for fold in np.array_split(idx, 10):
        train = np.setdiff1d(idx, fold)
        thr = max(np.unique(s[train]), key=lambda t: ((s[train] >= t) == y[train]).mean())
        accs.append(((s[fold] >= thr) == y[fold]).mean())
    acc = float(np.mean(accs))
    print(f"LFW DevTest accuracy on {len(pairs)} pairs (FaceNet, CenterFace, upright box crop +20 %): {acc:.4f}")
    assert acc >= 0.94


DEGRADE = {
    "blur": lambda im, k: cv2.GaussianBlur(im, (0, 0), 1.0 + 1.5 * k),
    "downscale": lambda im, k: cv2.resize(cv2.resize(im, None, fx=1 / (2 + 2 * k), fy=1 / (2 + 2 * k),
                                                     interpolation=cv2.INTER_AREA), im.shape[1::-1]),
    "noise": lambda im, k: np.clip(im + np.random.default_rng(k).normal(0, 12 + 12 * k, im.shape), 0, 255)
    .astype(np.uint8),
}


# A fall must beat a coin flip: a one-sided sign test over the 40 faces at P < 0.001 (30 falls or more), and the
# measured share may not slip (2026-12-01, severity 2 on these 40 faces). PreFIQs alone: blur 40, downscale 36,
# noise 23 of 40; the selection score (what ships as `quality`): 40 of 40 for all three.
@pytest.mark.parametrize("scoring,kind,min_frac", [
    ("prefiqs", "blur", 0.95), ("prefiqs", "downscale", 0.85),
    pytest.param("prefiqs", "noise", 0.75, marks=pytest.mark.xfail(
        strict=True, reason="known blind spot of PreFIQs alone: 23 of 40 (docs/QUALITY.md, noise 0.12)")),
    ("fused", "blur", 0.95), ("fused", "downscale", 0.95), ("fused", "noise", 0.95)])
def test_quality_falls_under_degradation(lfw_faces, scoring, kind, min_frac):
    scorer, prepared = build_scorer(FACENET)
    if scoring == "fused":
        with_selection(scorer, prepared, DetectorSpec())
    falls = 0
    firsts = [f for f in lfw_faces if f[1] == 1]
    for _, _, img, d in firsts:
        clean = scorer.score([align(img, d, FACENET)])[0].quality
        bad = scorer.score([align(DEGRADE[kind](img, 2), d, FACENET)])[0].quality
        falls += bad < clean
    frac = falls / len(firsts)
    p = binomtest(falls, len(firsts), 0.5, alternative="greater").pvalue
    print(f"{scoring}, {kind}: quality fell for {falls} of {len(firsts)} faces (sign test P = {p:.2g})")
    assert p < 1e-3 and frac >= min_frac


@pytest.mark.parametrize("recipe,min_rho", [("2:4/Bottleneck", 0.45), ("2:4@0.75-1", 0.35),
                                             ("unstructured:0.4", 0.35)])
def test_quality_tracks_true_utility(lfw_faces, recipe, min_rho):
    """Utility of a degraded copy of image 1 = its dense similarity to the person's clean image 2."""
    scorer, _ = build_scorer(FACENET, recipe)
    by = {(n, i): (img, d) for n, i, img, d in lfw_faces}
    quality, utility = [], []
    for n in sorted({n for n, _, _, _ in lfw_faces}):
        ref = scorer.score([align(*by[(n, 2)], FACENET)])[0].embedding
        img, d = by[(n, 1)]
        copies = [img] + [fn(img, k) for fn in DEGRADE.values() for k in range(1, 4)]
        for s in scorer.score([align(c, d, FACENET) for c in copies]):
            quality.append(s.quality)
            utility.append(float(s.embedding @ ref))
    rho = spearmanr(quality, utility).statistic
    print(f"recipe {recipe}: Spearman(quality, utility) = {rho:.3f} over {len(quality)} crops")
    assert rho >= min_rho


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=300,
                          **kw)


def test_score_cli_json_fields_and_bad_inputs(shared_dir, tmp_path):
    lfw = shared_dir / "data/lfw/images/Abdullah_Gul"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + bytes(200))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    r = run_cli("score", "--json", "--embedding", str(lfw / "Abdullah_Gul_0001.jpg"), str(bad), str(empty),
                str(blank), str(tmp_path / "missing.jpg"), str(lfw / "Abdullah_Gul_0002.jpg"))
    assert r.returncode == 1, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["image"].rsplit("/", 1)[-1] for rec in recs] == ["Abdullah_Gul_0001.jpg", "Abdullah_Gul_0002.jpg"]
    for rec in recs:
        assert set(rec) == {"image", "face", "bbox", "landmarks", "det_score", "quality", "prefiqs", "drift", "cues",
                            "ers", "embedding"}
        assert rec["ers"] > 1.0  # clean LFW faces: recognisable (the built-in threshold is 1.13 here)
        assert abs(rec["prefiqs"] - (1 - rec["drift"] / 2)) < 1e-4 and rec["cues"]["prefiqs"] == rec["prefiqs"]
        assert rec["cues"]["ers"] == pytest.approx(rec["ers"], abs=1e-4)
        # the selection score: these two clean, frontal LFW faces are likely to match (measured 0.73 and 0.77)
        assert 0.6 < rec["quality"] <= 1
        assert len(rec["bbox"]) == 4 and len(rec["landmarks"]) == 5 and len(rec["embedding"]) == 512
        assert abs(np.linalg.norm(rec["embedding"]) - 1) < 1e-3
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 3
    for name in ("broken.jpg", "empty.png", "missing.jpg"):
        assert sum(name in ln for ln in errors) == 1
    assert "blank.png: no face found" in r.stderr


def test_score_cli_aligned_and_folder(shared_dir, tmp_path):
    for i, name in enumerate(["Abdullah_Gul_0001.jpg", "Abdullah_Gul_0002.jpg"]):
        img = cv2.imread(str(shared_dir / "data/lfw/images/Abdullah_Gul" / name))
        cv2.imwrite(str(tmp_path / f"crop{i}.png"), img[45:205, 45:205])
    r = run_cli("score", "--aligned", "--json", str(tmp_path))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == 2 and all(rec["bbox"] is None for rec in recs)


def hostile_images(tmp_path):
    rng = np.random.default_rng(0)
    face = cv2.imread(str(tmp_path / "face.jpg"))
    files = {
        "random.jpg": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty.jpg": b"",
        "truncated.jpg": (tmp_path / "face.jpg").read_bytes()[:3000],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cv2.imwrite(str(tmp_path / "gray.png"), cv2.cvtColor(face, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(tmp_path / "deep16.png"), face.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "huge.png"), np.zeros((12000, 10000), np.uint8))
    cv2.imwrite(str(tmp_path / "tiny.png"), np.zeros((2, 2, 3), np.uint8))
    # A CMYK JPEG, written by matplotlib's Pillow.
    from PIL import Image

    Image.fromarray(face[..., ::-1]).convert("CMYK").save(tmp_path / "cmyk.jpg")


def test_hostile_images_do_not_crash(shared_dir, tmp_path):
    src = shared_dir / "data/lfw/images/Abdullah_Gul/Abdullah_Gul_0001.jpg"
    (tmp_path / "face.jpg").write_bytes(src.read_bytes())
    hostile_images(tmp_path)
    r = run_cli("score", "--json", str(tmp_path))
    assert r.returncode == 1, r.stderr
    scored = {json.loads(line)["image"].rsplit("/", 1)[-1] for line in r.stdout.splitlines()}
    # grey, 16-bit and CMYK images are converted and scored; the rest each get one error line
    assert {"face.jpg", "gray.png", "deep16.png", "cmyk.jpg"} <= scored
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    for name, why in [("random.jpg", "not a readable image"), ("empty.jpg", "empty file"),
                      ("huge.png", "too large"), ("tiny.png", "too small")]:
        assert any(name in ln and why in ln for ln in errors), (name, r.stderr)
    assert "Traceback" not in r.stderr


def test_score_cli_with_configured_models(shared_dir, tmp_path):
    """Another ArcFace-style FR model and another detector, by configuration only; with no recipe given the model
    gets the generic default (it has no FaceNet bottleneck layer)."""
    import yaml

    models = shared_dir / "models"
    cfg = {"models": {"fr": {"name": "mobilefacenet", "path": str(models / "mobilefacenet_128d.onnx"),
                             "input_size": 112, "crop": "template", "margin": 0.0, "normalize": "meanstd",
                             "mean": [127.5] * 3, "std": [127.5] * 3}},
           "defaults": {"detector": {"kind": "yunet", "path": str(models / "yunet_s_dynamic.onnx")}},
           "cameras": [{"id": "unused", "url": "unused"}]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    images = shared_dir / "data/images/face_recognition"
    r = run_cli("score", "--config", str(path), "--json", "--embedding", str(images / "two_people.jpg"),
                str(images / "obama.jpg"))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == 3 and all(len(rec["embedding"]) == 128 for rec in recs)
    assert all(0 < rec["quality"] < 1 for rec in recs)
    assert all(rec["ers"] > 0.8 for rec in recs)  # clean faces, by this model's own built-in ERS
    r = run_cli("models", "--config", str(path), "--json")
    report = json.loads(r.stdout)
    assert report["fr"]["name"] == "mobilefacenet" and report["fr"]["recipe"] == GENERIC_RECIPE
    assert report["fr"]["pattern_2_4_verified"] is True and report["detector"]["path"].endswith("yunet_s_dynamic.onnx")
    assert report["fr"]["ers"]["source"] == "builtin"  # built for this model (YuNet, template crops) by `score`


def test_configured_cache_dir_holds_every_prepared_file(tmp_path):
    """models.cache_dir takes the detector along with the FR model (not only $BESTSHOT_CACHE)."""
    import yaml

    cache = tmp_path / "cache"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": {"cache_dir": str(cache)}, "cameras": [{"id": "a", "url": "x"}]}))
    r = run_cli("models", "--config", str(path), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["fr"]["files"]["dense"]["path"].startswith(str(cache))
    assert report["detector"]["path"].startswith(str(cache))
