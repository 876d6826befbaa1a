"""Error-versus-Discard Characteristic (EDC): FNMR at a fixed FMR threshold as low-quality comparisons are discarded.

The protocol of the FIQA literature (CR-FIQA, PreFIQs; ISO/IEC 29794-1, Schlett et al. 2023 "Considerations on the
evaluation of biometric quality assessment algorithms"):
- a comparison matches when its similarity score is >= the threshold; the threshold is fixed once, on all impostor
  scores, at the target FMR, before anything is discarded;
- a comparison's quality is the lower of its two images' qualities;
- the genuine comparisons are sorted by that quality and the lowest fraction is discarded; FNMR is the share of the
  remaining genuine comparisons that do not match. Comparisons of equal quality are discarded together (the curve
  steps at each distinct quality value), as a quality threshold would;
- pAUC is the area under that step curve from 0 to the discard limit (30 % here), not normalised and with no
  "theoretical best" subtracted (the fiqat convention). `relative_pauc` divides it by what a random ranking gives in
  expectation (FNMR at 0 % held flat): 1 = no better than random, 0 = every error discarded first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def threshold_at_fmr(impostor: np.ndarray, fmr: float) -> float:
    """The lowest threshold at which at most `fmr` of the impostor scores match (score >= threshold)."""
    s = np.sort(np.asarray(impostor, np.float64).ravel())[::-1]
    if len(s) == 0:
        raise ValueError("no impostor scores")
    k = int(np.floor(fmr * len(s) + 1e-9))  # impostors allowed to match
    return float(np.nextafter(s[k], np.inf)) if k < len(s) else -np.inf


def fmr_supported(n_impostors: int, fmr: float, min_false_matches: int = 10) -> bool:
    """Enough impostors for the FMR to mean something: at least `min_false_matches` of them may match."""
    return n_impostors * fmr >= min_false_matches


@dataclass
class Edc:
    """The step curve: fnmr[i] holds from discard[i] up to discard[i + 1]."""

    discard: np.ndarray  # fraction of the genuine comparisons discarded, from 0, increasing
    fnmr: np.ndarray
    threshold: float

    def at(self, fractions: np.ndarray | float) -> np.ndarray:
        """FNMR at the given discard fractions (step interpolation)."""
        idx = np.searchsorted(self.discard, np.asarray(fractions, np.float64), side="right") - 1
        return self.fnmr[np.clip(idx, 0, len(self.fnmr) - 1)]

    def pauc(self, limit: float = 0.3) -> float:
        """Area under the step curve from 0 to `limit` discarded."""
        edges = np.minimum(np.r_[self.discard, 1.0], limit)
        return float(np.sum(self.fnmr * np.diff(edges)))

    def relative_pauc(self, limit: float = 0.3) -> float:
        """pAUC over the random-ranking expectation limit * FNMR(0); nan when FNMR(0) is 0."""
        base = limit * float(self.fnmr[0])
        return self.pauc(limit) / base if base > 0 else float("nan")


def edc(genuine: np.ndarray, quality: np.ndarray, threshold: float) -> Edc:
    """The EDC of genuine comparison scores with their pair qualities, at a fixed threshold."""
    g, q = np.asarray(genuine, np.float64).ravel(), np.asarray(quality, np.float64).ravel()
    if len(g) == 0 or len(g) != len(q):
        raise ValueError(f"need as many pair qualities as genuine scores (>0), got {len(q)} and {len(g)}")
    order = np.argsort(q, kind="stable")
    q, errors = q[order], (g[order] < threshold).astype(np.int64)
    remaining_errors = np.cumsum(errors[::-1])[::-1]
    starts = np.r_[0, np.flatnonzero(q[1:] != q[:-1]) + 1]  # discard counts at each distinct quality
    n = len(g)
    return Edc(starts / n, remaining_errors[starts] / (n - starts), float(threshold))


def pair_quality(q_a: np.ndarray, q_b: np.ndarray) -> np.ndarray:
    """The quality of a comparison: the lower of the two images' qualities."""
    return np.minimum(np.asarray(q_a, np.float64), np.asarray(q_b, np.float64))


def bootstrap_pauc(genuine: np.ndarray, quality: np.ndarray, threshold: float, limit: float = 0.3, n: int = 200,
                   seed: int = 0) -> np.ndarray:
    """pAUC over `n` resamples (with replacement) of the genuine comparisons, the threshold kept; the same seed
    draws the same resamples for every method, so their spreads compare pairwise."""
    g, q = np.asarray(genuine, np.float64).ravel(), np.asarray(quality, np.float64).ravel()
    idx = np.random.default_rng(seed).integers(0, len(g), (n, len(g)))
    return np.array([edc(g[i], q[i], threshold).pauc(limit) for i in idx])
