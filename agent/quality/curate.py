"""`bestshot curate`: a folder per identity in, a pruned and cleaned copy out (DiffProb, see agent/quality/diffprob.py),
with the reason for every removal (report.json, report.md), a kept/removed summary and a contact sheet."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.common.images import ImageError, expand_paths, read_image
from agent.pipeline.align import align
from agent.pipeline.detect import Detector
from agent.pipeline.score import Scorer
from agent.quality.diffprob import EPS, MIN_COS, diffprob, identity_floor, robust_centre
from agent.quality.ers import ErsModel, embed, largest_face

log = logging.getLogger(__name__)

REASONS = ("redundant", "label", "unrecognisable", "no-face", "unreadable")
THUMB = 96  # contact-sheet thumbnail side, pixels


@dataclass
class Item:
    identity: str
    path: Path
    thumb: np.ndarray | None = None  # the image fitted into THUMB x THUMB
    crop: np.ndarray | None = None
    reason: str | None = None  # one of REASONS; None = kept
    why: str = ""
    quality: float | None = None
    ers: float | None = None

    def remove(self, reason: str, why: str) -> None:
        self.reason, self.why = reason, why


def identity_images(in_dir: Path) -> tuple[list[str], list[Item]]:
    """The identity folders of `in_dir` and their image files. Symbolic links are not followed (a face set
    is often someone else's folder): one is logged and skipped."""
    root = in_dir.resolve()

    def inside(p: Path) -> bool:
        if p.is_symlink() or not p.resolve().is_relative_to(root):
            log.warning("%s: a symbolic link (or reached through one), skipped", p)
            return False
        return True

    identities = sorted(p.name for p in in_dir.iterdir() if p.is_dir() and inside(p))
    items = [Item(name, path) for name in identities for path in expand_paths([in_dir / name]) if inside(path)]
    return identities, items


def curate(in_dir: Path, out_dir: Path, scorer: Scorer, detector: Detector, ers: ErsModel | None = None,
           eps: float = EPS, min_cos: float = MIN_COS, floor: float | None = None) -> dict:
    """Curate `in_dir` (one sub-folder per identity) into `out_dir` (must not exist or be empty) and return the
    report. `floor`: cosine to the identity centre below which a face's label disagrees (default: the ERS model's
    identity floor, else DEFAULT_FLOOR). With `ers`, faces whose ERS is below its threshold are removed too."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"{in_dir}: no such folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty")
    floor = floor if floor is not None else identity_floor(ers)
    identities, items = identity_images(in_dir)
    log.info("curating %d images of %d identities from %s", len(items), len(identities), in_dir)
    for it in items:
        try:
            image = read_image(it.path)
        except ImageError as e:
            it.remove("unreadable", f"unreadable ({str(e).removeprefix(f'{it.path}: ')})")
            continue
        it.thumb = _fit(image, THUMB)
        det = largest_face(image, detector)
        if det is None:
            it.remove("no-face", "no-face")
        else:
            it.crop = align(image, det, scorer.spec)
    faces = [it for it in items if it.crop is not None]
    emb = np.zeros((0, 0), np.float32)
    if faces:
        emb, quality = embed(scorer, [it.crop for it in faces])
        for it, q, s in zip(faces, quality, ers.scores(emb) if ers else [None] * len(faces), strict=True):
            it.quality, it.ers = round(float(q), 5), None if s is None else round(float(s), 4)
            if ers is not None and s < ers.threshold:
                it.remove("unrecognisable", f"unrecognisable (ERS {s:.3f} < {ers.threshold:.3f})")
    rows = {name: [i for i, it in enumerate(faces) if it.identity == name and it.reason is None]
            for name in identities}
    rows = {name: idx for name, idx in rows.items() if idx}
    centres = {name: robust_centre(emb[idx], floor) for name, idx in rows.items()}
    for name, idx in rows.items():
        others = [n for n in rows if n != name]
        bank = np.stack([centres[n] for n in others]) if others else None
        r = diffprob(emb[idx], [faces[i].quality for i in idx], eps, min_cos, floor, bank)
        for x in r.removed:
            it = faces[idx[x.index]]
            if x.reason == "redundant":
                it.remove("redundant", f"redundant-with {faces[idx[x.other]].path.name}")
            elif x.other is not None:
                it.remove("label", f"label-disagrees (closest identity {others[x.other]})")
            else:
                it.remove("label", f"label-disagrees (cos {x.similarity:.2f} to {name}'s centre < {floor:.2f})")
    out_dir.mkdir(parents=True, exist_ok=True)
    for it in items:
        if it.reason is None:
            dst = out_dir / it.identity / it.path.relative_to(in_dir / it.identity)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(it.path, dst)
    report = _report(items, in_dir, out_dir, scorer.model_id, {"eps": eps, "min_cos": min_cos, "floor": floor,
                                                                 "ers_threshold": ers.threshold if ers else None})
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(_markdown(report))
    cv2.imwrite(str(out_dir / "contact_sheet.png"), contact_sheet(items, identities))
    s = report["summary"]
    log.info("kept %d of %d images; removed %s; report in %s", s["kept"], s["images"], s["removed"], out_dir)
    return report


def _report(items: list[Item], in_dir: Path, out_dir: Path, model_id: str, params: dict) -> dict:
    per: dict[str, dict] = {}
    for it in items:
        d = per.setdefault(it.identity, {"images": 0, "kept": [], "removed": []})
        d["images"] += 1
        name = str(it.path.relative_to(in_dir / it.identity))
        if it.reason is None:
            d["kept"].append({"file": name, "quality": it.quality} | ({"ers": it.ers} if it.ers is not None else {}))
        else:
            d["removed"].append({"file": name, "reason": it.reason, "why": it.why})
    removed = Counter(it.reason for it in items if it.reason is not None)
    return {"input": str(in_dir), "output": str(out_dir), "model_id": model_id, "params": params,
            "summary": {"identities": len(per), "images": len(items), "kept": sum(it.reason is None for it in items),
                        "removed": {r: removed[r] for r in REASONS if removed[r]}},
            "identities": per}


def _markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# Curated {report['input']}", "",
             f"{s['images']} images of {s['identities']} identities: {s['kept']} kept; removed "
             + (", ".join(f"{n} {r}" for r, n in s["removed"].items()) or "none")
             + f". Model {report['model_id']}, parameters {report['params']}.", "",
             "| identity | images | kept | " + " | ".join(REASONS) + " |", "|---" * (3 + len(REASONS)) + "|"]
    for name, d in report["identities"].items():
        n = Counter(r["reason"] for r in d["removed"])
        lines.append(f"| {name} | {d['images']} | {len(d['kept'])} | " + " | ".join(str(n[r]) for r in REASONS) + " |")
    lines += ["", "## Removed", ""]
    lines += [f"- {name}/{r['file']}: {r['why']}" for name, d in report["identities"].items() for r in d["removed"]]
    return "\n".join(lines) + "\n"


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """The image scaled into a size x size grey square, centred."""
    out = np.full((size, size, 3), 200, np.uint8)
    h, w = image.shape[:2]
    f = size / max(h, w)
    small = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    y, x = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    out[y : y + small.shape[0], x : x + small.shape[1]] = small
    return out


def _fits(text: str, width: int) -> bool:
    return cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.33, 1)[0][0] <= width


def _wrap(text: str, width: int, lines: int) -> list[str]:
    """Greedy word wrap into at most `lines` lines (overlong words and the last line cut)."""
    out = [""]
    for word in text.split():
        joined = f"{out[-1]} {word}".strip()
        if _fits(joined, width) or not out[-1]:
            out[-1] = joined
        elif len(out) < lines:
            out.append(word)
        else:
            break
    for i, line in enumerate(out):
        while line and not _fits(line, width):
            line = line[:-1]
        out[i] = line
    return out


def _tile(it: Item) -> np.ndarray:
    size, green, red = THUMB, (0, 160, 0), (0, 0, 210)
    tile = np.full((size + 52, size + 8, 3), 255, np.uint8)
    tile[: size + 8] = green if it.reason is None else red
    tile[4 : size + 4, 4 : size + 4] = np.full((size, size, 3), 200, np.uint8) if it.thumb is None else it.thumb
    colour = green if it.reason is None else red
    name = it.path.name
    while not _fits(name, size + 4):  # keep the end of long names (the image number)
        name = ".." + name[3:]
    lines = [(name, (0, 0, 0))] + [(t, colour) for t in _wrap(it.why or "kept", size + 4, 2)]
    for row, (text, c) in enumerate(lines):
        cv2.putText(tile, text, (3, size + 20 + 14 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.33, c, 1, cv2.LINE_AA)
    return tile


def contact_sheet(items: list[Item], identities: list[str], cols: int = 8) -> np.ndarray:
    """One block per identity (a title line, then its images): kept framed green, removed red with the reason."""
    width = cols * (THUMB + 8)
    blocks = []
    for name in identities:
        its = [it for it in items if it.identity == name]
        title = np.full((26, width, 3), 235, np.uint8)
        kept = sum(it.reason is None for it in its)
        cv2.putText(title, f"{name}: kept {kept} of {len(its)}", (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0),
                    1, cv2.LINE_AA)
        tiles = [_tile(it) for it in its]
        tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % cols) if tiles else []
        blocks += [title] + [np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)]
    return np.vstack(blocks) if blocks else np.full((26, width, 3), 255, np.uint8)
