"""INT8 scoring (`scoring.precision: int8`): the quantized shared-trunk graph against FP32 on real LFW faces, clean
and degraded, each with its own selection calibration, as the agent runs them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy.stats import spearmanr

from agent.common.fr_spec import FACENET
from agent.pipeline.align import align
from agent.pipeline.detect import DetectorSpec, make_detector
from agent.pipeline.score import build_scorer
from agent.quality.ers_builtin import int8_calibration
from agent.quality.selection import with_selection
from agent.service.config import ConfigError, parse_config
from engines.int8 import prepare_int8


@pytest.fixture(scope="module")
def crops(shared_dir) -> list[np.ndarray]:
    """The first image of 20 LFW people: clean, blurred, noisy and dark (two severities each)."""
    root = shared_dir / "data/lfw/images"
    people = sorted(p for p in root.iterdir() if len(list(p.iterdir())) >= 2)[:20]
    detector = make_detector(DetectorSpec(input_size=256))
    rng = np.random.default_rng(0)
    out = []
    for p in people:
        img = cv2.imread(str(p / f"{p.name}_0001.jpg"))
        d = min(detector.detect(img), key=lambda d: np.linalg.norm((d.bbox[:2] + d.bbox[2:]) / 2 - 125))
        c = align(img, d, FACENET)
        out.append(c)
        for k in (1, 2):
            out.append(cv2.GaussianBlur(c, (0, 0), 1.0 + 1.5 * k))
            out.append(np.clip(c + rng.normal(0, 12 * k, c.shape), 0, 255).astype(np.uint8))
            out.append((c * (0.5 / k)).astype(np.uint8))
    return out


def test_int8_ranks_faces_as_fp32_does(crops):
    det = DetectorSpec()
    fp32, prepared = build_scorer(FACENET)
    int8, prepared8 = build_scorer(FACENET, int8=int8_calibration(det))
    assert int8.model_id == f"{fp32.model_id}:int8" and prepared8.manifest["precision"] == "int8"
    assert prepared8.pair != prepared.pair and prepared8.dir != prepared.dir  # its own selection calibration
    for scorer, p in ((fp32, prepared), (int8, prepared8)):
        with_selection(scorer, p, det)
    a, b = fp32.score(crops), int8.score(crops)
    cos = np.array([float(x.embedding @ y.embedding) for x, y in zip(a, b, strict=True)])
    rho_q = spearmanr([x.quality for x in a], [y.quality for y in b]).statistic
    rho_p = spearmanr([x.prefiqs for x in a], [y.prefiqs for y in b]).statistic
    print(f"INT8 vs FP32 on {len(crops)} crops: embedding cosine min {cos.min():.4f} mean {cos.mean():.4f}; "
          f"Spearman quality {rho_q:.3f}, PreFIQs {rho_p:.3f}")
    # measured 2026-12-02: cosine min 0.9849, mean 0.9961; Spearman quality 0.991 (0.979 with an older cache's FP32
    # selection calibration), PreFIQs 0.980 (full-range weights, without reduce_range, fell to cosine 0.70 on some
    # LFW faces)
    assert cos.min() >= 0.97 and cos.mean() >= 0.99
    assert rho_q >= 0.96 and rho_p >= 0.96


def test_the_int8_graph_is_made_once(crops):
    _, prepared8 = build_scorer(FACENET, int8=int8_calibration())

    def never():
        raise AssertionError("quantized again")

    again = prepare_int8(build_scorer(FACENET)[1], never, int8_calibration().name)
    assert again.pair == prepared8.pair and again.pair.is_file()


def test_int8_needs_the_cpu_trunk():
    with pytest.raises(ValueError, match="int8 runs the shared-trunk graph on the onnxruntime"):
        build_scorer(FACENET, backend="tensorrt", int8=int8_calibration())
    with pytest.raises(ConfigError, match="scoring.precision: int8"):
        parse_config({"cameras": [{"id": "a", "url": "a.mp4"}], "scoring": {"precision": "int8"},
                      "backend": "onnxruntime-cuda"})
    assert parse_config({"cameras": [{"id": "a", "url": "a.mp4"}]}).scoring.precision == "fp32"


def test_eval_runs_the_agents_int8_graph(shared_dir):
    from agent.cli.main import build_parser
    from agent.quality.evaluate import Evaluator
    from engines.prepare import FACENET_RECIPE

    args = build_parser().parse_args(["eval", "tracks", "--precision", "int8"])
    assert args.precision == "int8"
    prepared = Evaluator(shared_dir / "data/lfw", precision=args.precision).prepared(FACENET_RECIPE)
    _, agents = build_scorer(FACENET, FACENET_RECIPE, int8=int8_calibration())
    assert prepared.pair == agents.pair and prepared.manifest["precision"] == "int8"
