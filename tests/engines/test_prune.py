"""Pruning and the shared trunk on a small residual ONNX network built here (the real FR model is
covered in test_scoring.py)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.prune import is_24, mask_24, prunable_layers, prune, select_layers
from engines.recipe import TWIN, Recipe
from engines.twin import shared_trunk


def toy_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    inits = [
        w("c0.w", 8, 3, 3, 3), w("c0.b", 8),  # 3 input channels: cannot carry 2:4
        w("c1.w", 8, 8, 3, 3), w("c1.b", 8),
        w("c2.w", 8, 8, 1, 1),
        w("c3.w", 16, 8, 3, 3),
        w("fc.w", 12, 16),  # Gemm transB=1: [N, K]
        w("mm.w", 12, 8),  # MatMul: [K, N]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c0.w", "c0.b"], ["a0"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "c1.w", "c1.b"], ["a1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w"], ["a2"], name="c2"),
        helper.make_node("Add", ["a2", "r0"], ["s"], name="residual"),
        helper.make_node("Conv", ["s", "c3.w"], ["a3"], name="c3", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["a3"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.w"], ["g"], name="fc", transB=1),
        helper.make_node("MatMul", ["g", "mm.w"], ["emb"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_recipe_text_round_trip_and_errors():
    for text in ["2:4", "2:4@0.75-1", "unstructured:0.4", "unstructured:0.3@0.5-1/Block8", "2:4@0.5-1+act"]:
        assert str(Recipe.parse(text)) == text
    r = Recipe.parse("2:4@0.75-1")
    assert r.kind == "2:4" and r.depth == (0.75, 1.0)
    for bad, why in [("3:4", "expected KIND"), ("2:4:0.5", "no ratio"), ("unstructured:1.5", "0 <= ratio < 1"),
                     ("2:4@0.8-0.2", "LO < HI"), ("2:4/(", "layer pattern '(': missing )"),
                     ("", "expected KIND")]:
        with pytest.raises(ValueError, match=re.escape(f"bad pruning recipe {bad!r}: ") + ".*" + re.escape(why)):
            Recipe.parse(bad)


def test_prunable_layers_axes_and_eligibility():
    layers = {p.node: p for p in prunable_layers(toy_model())}
    assert set(layers) == {"c0", "c1", "c2", "c3", "fc", "mm"}
    assert not layers["c0"].supports_24  # 3 input channels
    assert layers["c1"].axis == 1 and layers["fc"].axis == 1 and layers["mm"].axis == 0
    deep = select_layers(list(layers.values()), Recipe.parse("2:4@0.6-1"))
    assert [p.node for p in deep] == ["fc", "mm"]  # 5 eligible, the deepest 40 %


def test_mask_24_keeps_the_two_largest_of_each_group():
    w = np.array([[0.1, -0.9, 0.5, 0.05, 2.0, -3.0, 0.0, 1.0]], np.float32)
    keep = mask_24(w, axis=1)
    assert keep.tolist() == [[False, True, True, False, True, True, False, False]]


@pytest.mark.parametrize("text", ["2:4", "2:4@0.5-1", "2:4/c[13]"])
def test_24_pattern_exact_after_save_and_unpruned_bit_identical(tmp_path, text):
    dense = toy_model()
    result = prune(dense, Recipe.parse(text))
    path = tmp_path / "twin.onnx"
    onnx.save(result.model, str(path))
    back = arrays(onnx.load(str(path)))
    orig = arrays(dense)
    layers = {p.weight: p for p in prunable_layers(dense)}
    assert result.pruned, "recipe pruned nothing"
    for name, arr in back.items():
        if name in result.pruned:
            p = layers[name]
            assert is_24(arr, p.axis)
            groups = np.moveaxis(arr, p.axis, -1).reshape(-1, 4)
            assert ((groups == 0).sum(1) == 2).all()  # exactly 2 (no original zeros here)
            # kept weights are the original values, untouched
            nz = arr != 0
            assert np.array_equal(arr[nz], orig[name][nz])
        else:
            assert arr.tobytes() == orig[name].tobytes(), name


def test_unstructured_global_ratio():
    dense = toy_model()
    result = prune(dense, Recipe.parse("unstructured:0.4"))
    sizes = {t.name: int(np.prod(t.dims)) for t in dense.graph.initializer}
    total = sum(sizes[w] for w in result.pruned)
    zeros = sum(result.pruned[w] * sizes[w] for w in result.pruned)
    assert abs(zeros / total - 0.4) < 0.01
    assert "c0.w" in result.pruned  # unstructured may prune the 3-channel conv too
    # Global: layers with smaller weights lose more (the per-layer fractions differ).
    assert len({round(v, 2) for v in result.pruned.values()}) > 1


def test_per_layer_ratios():
    r = Recipe(kind="unstructured", ratio=0.0, per_layer={"c1": 0.5, "fc": 0.25})
    result = prune(toy_model(), r)
    assert abs(result.pruned["c1.w"] - 0.5) < 0.02 and abs(result.pruned["fc.w"] - 0.25) < 0.02
    assert result.pruned["c3.w"] == 0.0


def test_activation_criterion_changes_the_mask():
    dense = toy_model()
    scale = {p.weight: np.linspace(0.1, 4.0, p.shape[p.axis]).astype(np.float32) for p in prunable_layers(dense)}
    a = prune(dense, Recipe.parse("2:4"))
    b = prune(dense, Recipe.parse("2:4+act"), channel_scale=scale)
    wa, wb = arrays(a.model)["c3.w"], arrays(b.model)["c3.w"]
    assert is_24(wb, 1) and not np.array_equal(wa == 0, wb == 0)
    with pytest.raises(ValueError, match="calibration"):
        prune(dense, Recipe.parse("2:4+act"))


def test_shared_trunk_equals_separate_models_and_shares_the_early_layers():
    dense = toy_model()
    twin = prune(dense, Recipe.parse("2:4@0.5-1")).model  # c3, fc, mm pruned (c1, c2 not)
    pair = shared_trunk(dense, twin)
    x = np.random.default_rng(1).normal(size=(5, 3, 16, 16)).astype(np.float32)
    d_ref, t_ref = run(dense, x)[0], run(twin, x)[0]
    d, t, *stats = run(pair, x)  # then each stats depth's mean and mean square (engines/twin.py)
    assert np.allclose(d, d_ref, atol=1e-5) and np.allclose(t, t_ref, atol=1e-5)
    assert [o.name for o in pair.graph.output][2:] == ["stats/0/mean", "stats/0/meansq", "stats/1/mean",
                                                        "stats/1/meansq"]
    assert all(s.shape[0] == 5 and s.ndim == 2 for s in stats)
    assert not np.allclose(d, t)
    dup = {n.name[len(TWIN):] for n in pair.graph.node if n.name.startswith(TWIN)}
    assert dup == {"c3", "gap", "flat", "fc", "mm"}  # everything from the first pruned conv on


def test_shared_trunk_follows_residual_paths():
    dense = toy_model()
    twin = prune(dense, Recipe.parse("2:4/^c1$")).model
    pair = shared_trunk(dense, twin)
    dup = {n.name[len(TWIN):] for n in pair.graph.node if n.name.startswith(TWIN)}
    assert {"c1", "relu1", "c2", "residual", "c3"} <= dup and "c0" not in dup and "relu0" not in dup
    x = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
    assert np.allclose(run(pair, x)[1], run(twin, x)[0], atol=1e-5)


def test_shared_trunk_rejects_identical_twin():
    with pytest.raises(ValueError, match="no weight"):
        shared_trunk(toy_model(), toy_model())
