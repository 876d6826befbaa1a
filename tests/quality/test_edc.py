"""EDC, FMR threshold and pAUC against small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from agent.quality.edc import bootstrap_pauc, edc, fmr_supported, pair_quality, threshold_at_fmr


def test_threshold_at_fmr_by_hand():
    imp = np.arange(1, 11) / 10  # 0.1 .. 1.0
    t = threshold_at_fmr(imp, 0.1)  # one impostor of ten may match: only 1.0
    assert 0.9 < t <= 1.0 and (imp >= t).sum() == 1
    t = threshold_at_fmr(imp, 0.05)  # none may match
    assert t > 1.0 and (imp >= t).sum() == 0
    assert (imp >= threshold_at_fmr(imp, 0.3)).sum() == 3
    # ties: two of four may match, but three share the top score, so none does
    tied = np.array([0.5, 0.5, 0.5, 0.1])
    assert (tied >= threshold_at_fmr(tied, 0.5)).sum() == 0
    assert threshold_at_fmr(tied, 1.0) == -np.inf
    with pytest.raises(ValueError):
        threshold_at_fmr(np.array([]), 1e-3)


def test_fmr_supported():
    assert fmr_supported(10_000, 1e-3) and not fmr_supported(9_999, 1e-3) and fmr_supported(100_000, 1e-4)


def test_edc_by_hand():
    genuine = np.array([0.2, 0.9, 0.3, 0.8])
    quality = np.array([1.0, 4.0, 2.0, 3.0])  # the two non-matches (< 0.5) have the two lowest qualities
    e = edc(genuine, quality, 0.5)
    assert np.allclose(e.discard, [0, 0.25, 0.5, 0.75])
    assert np.allclose(e.fnmr, [2 / 4, 1 / 3, 0, 0])
    assert np.allclose(e.at([0, 0.1, 0.25, 0.3, 0.5, 0.95]), [0.5, 0.5, 1 / 3, 1 / 3, 0, 0])
    assert e.pauc(0.3) == pytest.approx(0.5 * 0.25 + (1 / 3) * 0.05)
    assert e.relative_pauc(0.3) == pytest.approx((0.125 + 0.05 / 3) / (0.3 * 0.5))
    assert e.pauc(1.0) == pytest.approx(0.5 * 0.25 + (1 / 3) * 0.25)


def test_edc_discards_equal_qualities_together():
    e = edc(np.array([0.2, 0.9, 0.3, 0.8]), np.array([1.0, 1.0, 2.0, 2.0]), 0.5)
    assert np.allclose(e.discard, [0, 0.5]) and np.allclose(e.fnmr, [0.5, 0.5])
    assert e.pauc(0.3) == pytest.approx(0.15) and e.relative_pauc(0.3) == pytest.approx(1.0)


def test_edc_inverted_quality_and_no_errors():
    e = edc(np.array([0.2, 0.9, 0.3, 0.8]), -np.array([1.0, 4.0, 2.0, 3.0]), 0.5)  # errors kept to the end
    assert np.allclose(e.fnmr, [2 / 4, 2 / 3, 2 / 2, 1 / 1])
    clean = edc(np.array([0.9, 0.8]), np.array([1.0, 2.0]), 0.5)
    assert clean.pauc() == 0 and np.isnan(clean.relative_pauc())
    with pytest.raises(ValueError):
        edc(np.array([0.1, 0.2]), np.array([1.0]), 0.5)


def test_pair_quality_is_the_lower_one():
    assert np.array_equal(pair_quality(np.array([0.2, 0.9]), np.array([0.5, 0.4])), [0.2, 0.4])


def test_pauc_ordering_on_a_synthetic_case():
    """Quality that knows the comparison score beats noisy quality, which beats random, which beats inverted."""
    rng = np.random.default_rng(0)
    genuine = rng.normal(0.6, 0.2, 5000)
    impostor = rng.normal(0.0, 0.1, 100_000)
    thr = threshold_at_fmr(impostor, 1e-3)
    oracle = edc(genuine, genuine, thr).pauc()
    informed = edc(genuine, genuine + rng.normal(0, 0.2, genuine.size), thr).pauc()
    random = edc(genuine, rng.random(genuine.size), thr).pauc()
    inverted = edc(genuine, -genuine, thr).pauc()
    assert oracle < informed < random < inverted
    fnmr0 = float(np.mean(genuine < thr))
    assert oracle == pytest.approx(sum(max(0.0, (fnmr0 - d) / (1 - d)) * 1e-4 for d in np.arange(0, 0.3, 1e-4)),
                                   abs=1e-3)  # discarding exactly the errors first: the theoretical best
    assert random / (0.3 * fnmr0) == pytest.approx(1.0, abs=0.1)


def test_bootstrap_pauc_spread():
    rng = np.random.default_rng(0)
    genuine = rng.normal(0.6, 0.2, 400)
    quality = genuine + rng.normal(0, 0.2, 400)
    boot = bootstrap_pauc(genuine, quality, 0.5, n=100)
    assert boot.shape == (100,) and abs(boot.mean() - edc(genuine, quality, 0.5).pauc()) < 3 * boot.std()
    assert np.array_equal(boot, bootstrap_pauc(genuine, quality, 0.5, n=100))  # same seed, same resamples
    assert bootstrap_pauc(genuine, genuine, 0.5, n=100).mean() < boot.mean()
