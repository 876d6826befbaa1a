"""The pair split at the branch point (engines/split.py): the dense graph with the branch-start outputs and the branch
alone, run one after the other in ONNX Runtime on the CPU, give the shared-trunk pair's embeddings and quality, for
every shipped recipe of the built-in FaceNet and for an ArcFace-style model (MobileFaceNet from ../shared/models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.common.fr_spec import FACENET, FRSpec
from agent.pipeline.score import prefiqs
from engines.prepare import FACENET_RECIPE, GENERIC_RECIPE, prepare_fr
from engines.recipe import TWIN
from engines.split import split_models, split_pair


def _mobilefacenet(shared_dir: Path) -> FRSpec:
    return FRSpec(name="mobilefacenet_128d", path=str(shared_dir / "models" / "mobilefacenet_128d.onnx"),
                  input_size=112, color="RGB", normalize="meanstd", mean=(127.5,) * 3, std=(127.5,) * 3,
                  crop="template", margin=0.0)


def _faces(size: int) -> np.ndarray:
    """Six inputs: smooth random images (face-like statistics do not matter for an exactness check) and noise."""
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(size=(3, 3, size, size)),
                           np.repeat(rng.uniform(-1, 1, size=(3, 3, 1, size)), size, axis=2)]).astype(np.float32)


@pytest.mark.parametrize("model,recipe", [("facenet", FACENET_RECIPE), ("facenet", GENERIC_RECIPE),
                                          ("mobilefacenet", GENERIC_RECIPE)])
def test_split_graphs_give_the_shared_trunk_quality(model, recipe, shared_dir, tmp_path):
    spec = FACENET if model == "facenet" else _mobilefacenet(shared_dir)
    prepared = prepare_fr(spec, recipe)
    split = split_pair(prepared.pair)
    x = _faces(spec.input_size)
    ref = OnnxRuntimeBackend(prepared.pair, threads=2).run(x)
    dense = OnnxRuntimeBackend(split.dense, threads=2).run(x)
    branch = OnnxRuntimeBackend(split.branch, threads=2)
    assert branch.output_names == [split.branch_output] == ["embedding_twin"]
    (twin,) = branch.session.run(None, {k: dense[k] for k in split.branch_inputs})
    emb = next(iter(ref))  # the dense embedding: the pair's first output ("embedding", "output", ...)
    assert np.array_equal(dense[emb], ref[emb])  # identical dense embedding
    assert all(np.array_equal(dense[k], v) for k, v in ref.items() if k.startswith("stats/"))
    q_ref, q_split = prefiqs(ref[emb], ref["embedding_twin"])[0], prefiqs(dense[emb], twin)[0]
    assert np.abs(q_split - q_ref).max() <= 1e-5
    # the split point is where the pruned layers start, and the branch holds every pruned layer and nothing shared
    pair = onnx.load(str(prepared.pair))
    twin_weights = {t.name for t in pair.graph.initializer if t.name.startswith(TWIN)}
    pruned = {n.name for n in pair.graph.node if twin_weights & set(n.input)}
    assert set(split.sparse_layers) == pruned and pruned
    branch_model = onnx.load(str(split.branch))
    assert all(n.name.startswith(TWIN) or n.name == "twin_output" for n in branch_model.graph.node)
    assert len(branch_model.graph.node) < len(onnx.load(str(split.dense)).graph.node)
    if recipe == FACENET_RECIPE:  # the bottleneck: the branch is the 1792->512 product, its batch norm, the L2 norm
        assert split.branch_inputs == ["InceptionResnetV1/Logits/Flatten/flatten/Reshape"]
        assert split.sparse_layers == ["twin/InceptionResnetV1/Bottleneck/MatMul"]
    # written once: a second call reuses the files
    mtime = split.branch.stat().st_mtime_ns
    assert split_pair(prepared.pair) == split and split.branch.stat().st_mtime_ns == mtime


def test_a_pair_without_a_branch_or_branching_at_the_input_is_refused():
    prepared = prepare_fr(FACENET, FACENET_RECIPE)
    pair = onnx.load(str(prepared.pair))
    dense = onnx.load(str(prepared.dense))
    with pytest.raises(ValueError, match="no twin branch"):
        split_models(dense)
    first = pair.graph.node[0]
    first.name = TWIN + "first"  # as if the very first layer were pruned: the branch reads the model input
    with pytest.raises(ValueError, match="starts at the model input"):
        split_models(pair)
