"""`bestshot tune` on the LFW tuning split: the selection score's shipped constants are what `tune --selection`
fits, and the recipe search measures every recipe and picks its winner among the 2:4 ones."""

from __future__ import annotations

import json

import numpy as np

from agent.quality.selection import PROBABILITY, PROBABILITY_NO_STATS, WEIGHTS, WEIGHTS_NO_STATS
from agent.quality.tune import tune, tune_selection
from engines.prepare import FACENET_RECIPE


def test_tune_selection_fits_the_shipped_constants(shared_dir, tmp_path):
    """agent/quality/selection.py says its weights and probability map are this fit's output: refit and compare
    (seeded and deterministic here; the tolerance allows another CPU's rounding, not another fit)."""
    res = tune_selection(tmp_path, lfw=shared_dir / "data/lfw")
    for form, weights, prob in (("full", WEIGHTS, PROBABILITY), ("no_stats", WEIGHTS_NO_STATS, PROBABILITY_NO_STATS)):
        got = res[form]["weights"]
        assert list(got) == list(weights), form
        assert max(abs(got[k] - weights[k]) for k in weights) < 0.02, (form, got)
        assert np.allclose(res[form]["probability"], prob, atol=0.02), (form, res[form]["probability"])
    assert res["full"]["track_gain"] > res["no_stats"]["track_gain"] > 0.7  # 0.864 and 0.774 (docs/QUALITY.md)
    # no degradation kind depends on having been seen: held out of the fit, each still ranks (pose, the weakest: 0.298)
    held_out = {k: v["spearman_held_out"] for k, v in res["full"]["leave_one_kind_out"].items()}
    assert len(held_out) == 8 and min(held_out.values()) > 0.25, held_out
    assert json.loads((tmp_path / "tune-selection.json").read_text())["full"]["weights"] == res["full"]["weights"]
    assert (tmp_path / "tune-selection.md").read_text().startswith("| form | weights |")


def test_recipe_search_picks_its_winner_among_the_2_4_recipes(shared_dir, tmp_path):
    res = tune(tmp_path, [FACENET_RECIPE, "unstructured:0.4"], lfw=shared_dir / "data/lfw", limit=4, frames=6,
               variants=1)
    rows = res["recipes"]
    assert list(rows) == [FACENET_RECIPE, "unstructured:0.4"] and res["config"]["people"] == 4
    for name, row in rows.items():
        assert {"pauc_facenet", "track_gain", "twin_macs", "mean_rank"} <= set(row), name
        assert 1.0 <= row["mean_rank"] <= 2.0 and -1.0 <= row["track_gain"] <= 1.0, (name, row)
    # the 2:4 bottleneck twin is one 1792x512 product (0.06 % of FaceNet's MACs); unstructured pruning saves nothing
    assert rows[FACENET_RECIPE]["twin_macs"] < 0.001 < 0.9 < rows["unstructured:0.4"]["twin_macs"]
    assert res["winner"] == FACENET_RECIPE  # the only 2:4 recipe, whatever the ranks say
    assert res["baselines"]["oracle"]["track_gain"] == 1.0 and "lightqnet" in res["baselines"]
    assert (tmp_path / "tune.md").read_text().count("**(chosen)**") == 1
