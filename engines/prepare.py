"""Model preparation into a cache directory: the dense FR model, its pruned twin, the shared-trunk pair.

Layout under the cache root (default `$XDG_CACHE_HOME/bestshot`, or `BESTSHOT_CACHE`):
    fr/<name>-<sha12>/dense.onnx + manifest.json
    fr/<name>-<sha12>/<recipe>/twin.onnx, pair.onnx + manifest.json (recipe, per-layer sparsity)
    det/<name>-<sha12>.onnx
Every file is written atomically and under a lock, so preparing twice (or from two processes at
once) reuses the cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.common.cache import atomic_write, cache_root, locked, read_json, sha256_file, write_json
from agent.common.fr_spec import FRSpec
from engines.recipe import STAT_DEPTHS, Recipe

# onnx and the graph surgery are imported where a model is prepared: a start that finds the cache fresh needs
# neither, and onnx alone costs it about a second.
if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# Default recipes, chosen by `bestshot tune` (docs/QUALITY.md). The built-in FaceNet: 2:4 on its bottleneck (the
# final 1792->512 projection) only; the twin branch costs 0.06 % of the dense multiply-accumulates. Other FR models
# have no layer of that name: 2:4 on the deepest quarter of their eligible layers, the best depth range tune found.
FACENET_RECIPE = "2:4/Bottleneck"
GENERIC_RECIPE = "2:4@0.75-1"


def default_recipe(spec: FRSpec) -> str:
    return FACENET_RECIPE if spec.path is None else GENERIC_RECIPE


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    import onnx

    atomic_write(path, lambda p: onnx.save(model, str(p)))


@dataclass
class PreparedFR:
    spec: FRSpec
    recipe: Recipe
    dense: Path
    twin: Path
    pair: Path
    manifest: dict
    dir: Path


def fr_source(spec: FRSpec) -> Path:
    """The file the FR model is prepared from: the wheel's FaceNet graph or the configured ONNX."""
    if spec.path is None:
        from engines.wheels import facenet_pb_path

        return facenet_pb_path()
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FR model {spec.name!r}: file not found: {path}")
    return path


def _dense_model(spec: FRSpec, source: Path, dst: Path) -> None:
    if spec.path is None:
        from engines.facenet import convert_facenet

        atomic_write(dst, lambda p: convert_facenet(source, p))
        return
    import onnx

    from engines.onnx_fix import normalise_fr_model

    save_onnx(normalise_fr_model(onnx.load(str(source)), spec.output), dst)


def prepare_fr(spec: FRSpec, recipe: Recipe | str | None = None, root: Path | None = None) -> PreparedFR:
    """Prepare (or reuse) the dense model, the pruned twin and the shared-trunk pair for `recipe` (None: the
    model's default recipe)."""
    recipe = recipe or default_recipe(spec)
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    source = fr_source(spec)
    source_sha = sha256_file(source)
    base = (root or cache_root()) / "fr" / f"{spec.name}-{source_sha[:12]}"
    dense = base / "dense.onnx"
    with locked(dense):
        base_manifest = read_json(base / "manifest.json")
        if not (dense.is_file() and base_manifest and base_manifest.get("source_sha256") == source_sha):
            t0 = time.monotonic()
            log.info("preparing FR model %s from %s", spec.name, source)
            base.mkdir(parents=True, exist_ok=True)
            _dense_model(spec, source, dense)
            base_manifest = {
                "version": MANIFEST_VERSION,
                "model": spec.name,
                "source": str(source),
                "source_sha256": source_sha,
                "dense_sha256": sha256_file(dense),
                "seconds": round(time.monotonic() - t0, 1),
            }
            write_json(base / "manifest.json", base_manifest)

    rdir = base / recipe.slug
    twin, pair = rdir / "twin.onnx", rdir / "pair.onnx"
    with locked(twin):
        manifest = read_json(rdir / "manifest.json")
        fresh = (
            manifest
            and manifest.get("dense_sha256") == base_manifest["dense_sha256"]
            and manifest.get("recipe") == str(recipe)
            and manifest.get("activation_stats") == list(STAT_DEPTHS)
            and twin.is_file()
            and pair.is_file()
        )
        if not fresh:
            if recipe.criterion == "activation":
                raise ValueError(
                    f"recipe {recipe}: the activation criterion is prepared by `bestshot tune`, "
                    "which has the calibration faces"
                )
            import onnx

            from engines.prune import prune
            from engines.twin import shared_trunk

            log.info("pruning %s with recipe %s", spec.name, recipe)
            rdir.mkdir(parents=True, exist_ok=True)
            dense_model = onnx.load(str(dense))
            result = prune(dense_model, recipe)
            save_onnx(result.model, twin)
            save_onnx(shared_trunk(dense_model, result.model), pair)
            manifest = build_manifest(spec, recipe, base_manifest, result.model, result.pruned, twin, pair)
            write_json(rdir / "manifest.json", manifest)
    return PreparedFR(spec, recipe, dense, twin, pair, manifest, rdir)


def build_manifest(
    spec: FRSpec,
    recipe: Recipe,
    base: dict,
    twin_model: onnx.ModelProto,
    pruned: dict[str, float],
    twin: Path,
    pair: Path,
) -> dict:
    from onnx import numpy_helper

    from engines.prune import is_24, prunable_layers

    inits = {t.name: t for t in twin_model.graph.initializer}
    layers = {p.weight: p for p in prunable_layers(twin_model)}
    pattern_ok = recipe.kind != "2:4" or all(
        is_24(numpy_helper.to_array(inits[w]), layers[w].axis) for w in pruned
    )
    return {
        "version": MANIFEST_VERSION,
        "model": spec.name,
        "source_sha256": base["source_sha256"],
        "dense_sha256": base["dense_sha256"],
        "twin_sha256": sha256_file(twin),
        "pair_sha256": sha256_file(pair),
        "recipe": str(recipe),
        "layers_pruned": len(pruned),
        "layers_eligible": sum(1 for p in layers.values() if p.supports_24),
        "layers_total": len(layers),
        "sparsity": {w: round(s, 4) for w, s in pruned.items()},
        "pattern_2_4_verified": pattern_ok,
        "activation_stats": list(STAT_DEPTHS),
    }


def prepare_detector_file(name: str, source: Path, prepare: Callable[[Path, Path], None] | None,
                          root: Path | None = None) -> Path:
    """Prepare a detector ONNX into the cache (or return the configured file when it needs nothing)."""
    if prepare is None:
        return source
    sha = sha256_file(source)
    dst = (root or cache_root()) / "det" / f"{name}-{sha[:12]}.onnx"
    with locked(dst):
        if not dst.is_file():
            log.info("preparing detector %s from %s", name, source)
            atomic_write(dst, lambda p: prepare(source, p))
    return dst
