"""DiffProb (Caldeira et al., FG 2025) for tracks and face sets: keep an identity's samples whose prediction
probabilities differ, drop the redundant ones and those whose predicted identity disagrees with their label.

The probability proxy comes from the samples' own embeddings: p = (1 + cos(e, c)) / 2, with c the identity's
robust centre (seeded at the medoid, refined over the samples within `floor` of it). Samples are visited in
descending quality; one whose p lies within `eps` of an already kept sample's is redundant, provided the two
embeddings also agree (cosine >= `min_cos`). That guard is needed because a one-number probability collides for
distinct photos: on LFW (FaceNet) gaps of 0.001 between distinct photos of one person are common, while a 0.85x
resized copy moves p by up to 0.018, so p alone cannot tell a copy from a new view (`min_cos=-1` gives the
probability rule alone). A sample's label disagrees (it is cleaned) when it is closer to another identity's centre
than to its own, or below `floor` of its own; within a track, that flags a tracker identity switch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.pipeline.score import l2n
from agent.pipeline.select import Candidate
from agent.quality.ers import WEIGHTS, ErsModel, template, unit_mean

log = logging.getLogger(__name__)

EPS = 0.03  # probability margin for redundancy
MIN_COS = 0.92  # ... and embedding agreement (LFW: resized copies 0.94-0.995, distinct photos of a person < 0.9)
DEFAULT_FLOOR = 0.4  # cosine to the identity centre when no calibrated ERS gives one (FaceNet: see ErsModel)
SWITCH = "identity-switch"


@dataclass
class Removal:
    index: int
    reason: str  # "redundant" | "label"
    similarity: float  # cosine to its identity's centre
    other: int | None = None  # redundant: the kept sample it repeats; label: the closer identity's bank row


@dataclass
class Pruned:
    kept: list[int]  # in descending quality
    removed: list[Removal]
    prob: np.ndarray
    centre: np.ndarray


def identity_floor(ers: ErsModel | None) -> float:
    """The calibrated identity floor of the FR model, else DEFAULT_FLOOR."""
    return DEFAULT_FLOOR if ers is None or ers.identity_floor is None else ers.identity_floor


def robust_centre(emb: np.ndarray, floor: float, iters: int = 10) -> np.ndarray:
    """The normalised mean of the samples within `floor` (cosine) of it, grown from the medoid."""
    emb = l2n(emb)
    inliers = np.zeros(len(emb), bool)
    inliers[np.argmax((emb @ emb.T).sum(1))] = True
    for _ in range(iters):
        centre = unit_mean(emb[inliers])
        new = emb @ centre >= floor
        if not new.any() or (new == inliers).all():
            break
        inliers = new
    return centre


def diffprob(emb: np.ndarray, quality: Sequence[float], eps: float = EPS, min_cos: float = MIN_COS,
             floor: float = DEFAULT_FLOOR, bank: np.ndarray | None = None) -> Pruned:
    """Prune one identity's samples. `bank`: the other identities' centres (rows), for the label check."""
    emb = l2n(emb)
    centre = robust_centre(emb, floor)
    own = emb @ centre
    prob = (1.0 + own) / 2.0
    rival, closest = np.full(len(emb), -np.inf), np.zeros(len(emb), int)
    if bank is not None and len(bank):
        sims = emb @ l2n(bank).T
        rival, closest = sims.max(1), sims.argmax(1)
    kept: list[int] = []
    removed: list[Removal] = []
    for i in map(int, np.argsort(-np.asarray(quality, np.float64), kind="stable")):
        if rival[i] > own[i] or own[i] < floor:
            removed.append(Removal(i, "label", float(own[i]), int(closest[i]) if rival[i] > own[i] else None))
            continue
        dup = [j for j in kept if abs(prob[i] - prob[j]) <= eps and emb[i] @ emb[j] >= min_cos]
        if dup:
            removed.append(Removal(i, "redundant", float(own[i]), max(dup, key=lambda j: float(emb[i] @ emb[j]))))
        else:
            kept.append(i)
    return Pruned(kept, removed, prob, centre)


def diverse_shots(kept: Sequence[Candidate], k: int, eps: float = EPS, min_cos: float = MIN_COS,
                  floor: float = DEFAULT_FLOOR) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """Up to k shots of one track by DiffProb (best quality first), and the frames it removed with the reason:
    "redundant-with frame N" or "identity-switch (cos x to the track centre)"."""
    r = diffprob(np.stack([c.scored.embedding for c in kept]), [c.scored.quality for c in kept], eps, min_cos, floor)
    removed = [(kept[x.index], f"redundant-with frame {kept[x.other].frame_index}" if x.reason == "redundant"
                else f"{SWITCH} (cos {x.similarity:.2f} to the track centre)") for x in r.removed]
    return [kept[i] for i in r.kept[:k]], removed


def enrich_factory(ers: ErsModel | None, top_k: int, template_weights: str = "ers", eps: float = EPS,
                   min_cos: float = MIN_COS) -> Callable[[Candidate, list[Candidate]], dict]:
    """The Selector's `enrich` hook: ERS of the best shot, the track template, DiffProb shots (top_k > 1) and the
    frames suspected of an identity switch (recognisable frames far from the track's identity centre)."""
    if template_weights not in WEIGHTS:
        raise ValueError(f"unknown template weights {template_weights!r}: one of {WEIGHTS}")
    if template_weights == "ers" and ers is None:
        log.warning("no ERS for this FR model: quality-weighted templates")
        template_weights = "quality"
    floor = identity_floor(ers)

    def enrich(best: Candidate, kept: list[Candidate]) -> dict:
        out: dict = {}
        if ers is not None:
            s = ers.score(best.scored.embedding)
            out |= {"ers": round(s, 4), "recognisable": s >= ers.threshold}
        chosen, removed = diverse_shots(kept, top_k, eps, min_cos, floor)
        off = [c for c, why in removed if why.startswith(SWITCH)]
        members = [c for c in kept if all(c is not o for o in off)] or kept
        out |= {"template": [round(float(v), 6) for v in template(members, template_weights, ers)],
                "template_frames": len(members)}
        if top_k > 1:
            out["shots"] = [{"frame_index": c.frame_index, "quality": round(c.scored.quality, 5)}
                            | ({} if ers is None else {"ers": round(ers.score(c.scored.embedding), 4)})
                            for c in chosen]
        suspects = [c.frame_index for c in off if ers is None or ers.recognisable(c.scored.embedding)]
        if suspects:
            out["identity_switch_suspects"] = sorted(suspects)
        return out

    return enrich
