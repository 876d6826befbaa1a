"""`bestshot eval pairs` and `bestshot eval tracks`: the evidence that the quality score ranks faces by FR utility.

Protocols (docs/QUALITY.md has the tables and the commands):
- pairs: the LFW View 1 DevTest pairs (test split: the pairs of people outside the tuning split). Each pair has a
  reference and a probe side (a seeded coin). Protocol "clean" compares them as they are; protocol "degraded"
  replaces every probe by a seeded degraded copy (agent.quality.degrade: one kind drawn uniformly, severity uniform in
  [0, 1]), detected again. Genuine comparisons: the matched pairs; impostor comparisons: every reference against
  every probe of another person (about 1e6, so FMR 1e-3 and 1e-4 are measured, not extrapolated). Comparison
  scores are cosines under the scoring model (FaceNet, dense) and, separately, another FR model (MobileFaceNet);
  the EDC is agent.quality.edc's.
- tracks: synthetic tracks (one LFW image of a person degraded frame by frame under a seeded schedule, the
  person's second image as the enrolment) and real ones (the Hamilton clip, detected and tracked, each track
  assigned to the enrolment image it resembles most if the similarity clears a threshold). A frame's utility is
  its cosine to the enrolment under the other FR model (not the scoring one); each method picks its best-quality
  frame per track. Natural tracks: a test-split person's own clean LFW photos as the frames of one track (their
  first photo the enrolment), so pose, expression, lighting and age vary as they do between real sightings, with
  no synthetic degradation.
Faces are detected once per image (CenterFace); a degraded face the detector misses keeps the clean detection
mapped through the degradation, with detector score 0.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from scipy.stats import spearmanr

from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.backends.pairs import SharedTrunk
from agent.common.fr_spec import FACENET, FRSpec, preprocess
from agent.common.progress import Progress
from agent.pipeline.align import align
from agent.pipeline.detect import DetectorSpec, make_detector
from agent.pipeline.score import Evidence, Scorer, face_brightness, l2n, prefiqs
from agent.pipeline.select import sharpness
from agent.pipeline.sources.demo import demo_clip_path, load_truth, people
from agent.pipeline.track import Tracker, iou_matrix
from agent.quality.baselines import LightQNet, lightqnet_crop, random_quality, rank_fusion
from agent.quality.degrade import KINDS, Degradation, degrade, map_box, map_points, random_degradation
from agent.quality.edc import bootstrap_pauc, edc, fmr_supported, pair_quality, threshold_at_fmr
from agent.quality.ers import ErsModel, load_ers
from agent.quality.ers_builtin import builtin_ers, calibration_faces, ensure_ers, int8_calibration
from agent.quality.selection import STATS_CUES, SelectionScore, ensure_selection, raw_cues
from agent.types import Detection
from engines.prepare import PreparedFR, prepare_fr
from engines.recipe import Recipe

log = logging.getLogger(__name__)

SHARED = Path(__file__).resolve().parents[3] / "shared"
LFW = SHARED / "data" / "lfw"
OTHER_MODEL = SHARED / "models" / "mobilefacenet_128d.onnx"
LIGHTQNET = SHARED / "models" / "lightqnet" / "lightqnet-dm100.onnx"
VIDEO = SHARED / "data" / "video" / "short_hamilton_clip.mp4"
ENROLMENTS = {n: SHARED / "data" / "images" / "face_recognition" / f"{n}.png"
              for n in ("lin-manuel-miranda", "alex-lacamoire")}
DISCARD = np.round(np.arange(0.0, 0.951, 0.01), 2)  # the EDC points written out
PAUC_LIMIT = 0.3
FMRS = (1e-3, 1e-4)
BATCH = 32


def other_spec(path: Path = OTHER_MODEL) -> FRSpec:
    """A MobileFaceNet-style ArcFace model: 112 px, 5-point template, (x - 127.5) / 127.5, RGB."""
    return FRSpec(name=Path(path).stem, path=str(path), input_size=112, crop="template", margin=0.0,
                  normalize="meanstd", mean=(127.5,) * 3, std=(127.5,) * 3)


# ---------------------------------------------------------------- data: LFW split, faces


@dataclass(frozen=True)
class LfwImage:
    person: str
    number: int

    @property
    def key(self) -> str:
        return f"{self.person}/{self.number}"

    def read(self, lfw: Path) -> np.ndarray:
        return cv2.imread(str(lfw / "images" / self.person / f"{self.person}_{self.number:04d}.jpg"))


def devtest_pairs(lfw: Path) -> list[tuple[LfwImage, LfwImage]]:
    out = []
    for line in (lfw / "pairsDevTest.txt").read_text().splitlines()[1:]:
        p = line.split()
        if len(p) == 3:
            out.append((LfwImage(p[0], int(p[1])), LfwImage(p[0], int(p[2]))))
        elif len(p) == 4:
            out.append((LfwImage(p[0], int(p[1])), LfwImage(p[2], int(p[3]))))
    return out


def person_images(lfw: Path, person: str) -> list[LfwImage]:
    return [LfwImage(person, int(f.stem.rsplit("_", 1)[1])) for f in sorted((lfw / "images" / person).glob("*.jpg"))]


def lfw_split(lfw: Path) -> tuple[list[tuple[LfwImage, LfwImage]], list[str]]:
    """(test pairs, tuning people). Tuning people: those with 2+ images who are in no matched DevTest pair (65);
    the test pairs are the DevTest pairs without them (all 500 matched, 423 of the 500 mismatched)."""
    pairs = devtest_pairs(lfw)
    matched = {a.person for a, b in pairs if a.person == b.person}
    people = {x.person for pair in pairs for x in pair}
    tune = sorted(p for p in people - matched if len(list((lfw / "images" / p).glob("*.jpg"))) >= 2)
    tset = set(tune)
    return [(a, b) for a, b in pairs if a.person not in tset and b.person not in tset], tune


@dataclass
class Faces:
    """Faces with everything the evaluation needs of them, computed once: the scoring model's crops (PreFIQs runs
    on them per recipe), the other FR model's embeddings and the cheap signals."""

    keys: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    other: list[np.ndarray] = field(default_factory=list)
    cheap: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ("size", "sharpness",
                                                                                     "detector", "lightqnet")})

    def __len__(self) -> int:
        return len(self.keys)

    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def other_emb(self) -> np.ndarray:
        return np.stack(self.other)


Item = tuple[str, str, np.ndarray, Detection]  # key, identity, frame, detection


def pick(dets: list[Detection], expected: Detection, min_iou: float = 0.2) -> Detection:
    """The detection overlapping the expected box most, or the expected one with score 0 when none overlaps."""
    if dets:
        iou = iou_matrix(expected.bbox[None], np.stack([d.bbox for d in dets]))[0]
        if iou.max() >= min_iou:
            return dets[int(iou.argmax())]
    return Detection(expected.bbox.copy(), 0.0, None if expected.landmarks is None else expected.landmarks.copy())


def degrade_face(image: np.ndarray, det: Detection, ds: Sequence[Degradation]) -> tuple[np.ndarray, Detection]:
    """Apply degradations in turn; the clean detection mapped through them (detector score 0)."""
    h = np.eye(3)
    for d in ds:
        image, m = degrade(image, d, map_box(h, det.bbox))
        h = m @ h
    lms = None if det.landmarks is None else map_points(h, det.landmarks)
    return image, Detection(map_box(h, det.bbox), 0.0, lms)


class Evaluator:
    """The models of an evaluation run and its in-memory caches: detections per image, dense embeddings per face,
    PreFIQs quality per (recipe, face)."""

    def __init__(self, lfw: Path = LFW, other_model: Path = OTHER_MODEL, lightqnet: Path = LIGHTQNET,
                 threads: int | None = None, cache: Path | None = None, precision: str = "fp32",
                 detector: DetectorSpec | None = None):
        self.lfw, self.threads, self.cache, self.precision = Path(lfw), threads, cache, precision
        self.det = replace(detector or DetectorSpec(), threads=threads)  # what the agent would run (clips, calibration)
        self.spec = FACENET
        self.other_spec = other_spec(other_model)
        self.detector = make_detector(replace(self.det, input_size=256))  # LFW images are 250 px
        # prepare_fr builds a twin too; only the dense model is used, so any recipe with layers in every model
        self.other = OnnxRuntimeBackend(prepare_fr(self.other_spec, "2:4@0.75-1", cache).dense, threads)
        self.lightqnet = LightQNet(lightqnet, threads)
        self._prepared: dict[str, PreparedFR] = {}
        self._trunks: dict[str, SharedTrunk] = {}
        self._dets: dict[str, Detection] = {}
        self._dense: dict[str, np.ndarray] = {}
        self._stats: dict[str, dict[str, np.ndarray]] = {}
        self._quality: dict[tuple[str, str], float] = {}
        self._selection: SelectionScore | None = None
        self._calibration: np.ndarray | None = None
        self._ers: ErsModel | None = None

    # --- faces
    def clean(self, img: LfwImage) -> tuple[np.ndarray, Detection]:
        """An LFW image and its face (detected once per run)."""
        image = img.read(self.lfw)
        if image is None:
            raise FileNotFoundError(f"LFW image {img.key} not found under {self.lfw}")
        if img.key not in self._dets:
            h, w = image.shape[:2]
            centre = Detection(np.array([w / 4, h / 4, 3 * w / 4, 3 * h / 4], np.float32), 0.0)
            self._dets[img.key] = pick(self.detector.detect(image), centre, 0.05)
        return image, self._dets[img.key]

    def degraded(self, img: LfwImage, ds: Sequence[Degradation]) -> tuple[np.ndarray, Detection]:
        image, det = degrade_face(*self.clean(img), ds)
        return image, pick(self.detector.detect(image), det)

    def faces(self, items: Iterable[Item], label: str, total: int) -> Faces:
        """Extract crops, other-model embeddings and cheap signals, in batches."""
        out, chunk, bar = Faces(), [], Progress(label, total)
        for item in items:
            chunk.append(item)
            if len(chunk) == BATCH:
                self._extract(chunk, out)
                bar(len(chunk))
                chunk = []
        if chunk:
            self._extract(chunk, out)
            bar(len(chunk))
        bar.close()
        return out

    def _extract(self, items: list[Item], out: Faces) -> None:
        tmpl = [align(img, det, self.other_spec) for _, _, img, det in items]
        emb = l2n(next(iter(self.other.run(preprocess(tmpl, self.other_spec)).values())))
        lq = self.lightqnet.score([lightqnet_crop(img, det) for _, _, img, det in items])
        for (key, ident, img, det), t, e, q in zip(items, tmpl, emb, lq, strict=True):
            out.keys.append(key)
            out.ids.append(ident)
            out.crops.append(align(img, det, self.spec))
            out.other.append(e)
            for name, v in (("size", det.size), ("sharpness", sharpness(t)), ("detector", det.score),
                            ("lightqnet", float(q))):
                out.cheap[name].append(float(v))

    def calibration(self) -> np.ndarray:
        """Clean scoring-model crops of the tuning people: calibration faces for the activation criterion."""
        if self._calibration is None:
            imgs = [im for p in lfw_split(self.lfw)[1] for im in person_images(self.lfw, p)]
            items = ((im.key, im.person, *self.clean(im)) for im in imgs)
            self._calibration = np.stack(self.faces(items, "calibration faces", len(imgs)).crops)
        return self._calibration

    # --- PreFIQs
    def prepared(self, recipe: str) -> PreparedFR:
        """The scoring model's twin for `recipe` (activation-criterion recipes calibrated on `calibration()`)."""
        if recipe not in self._prepared:
            r = Recipe.parse(recipe)
            if r.criterion == "activation":
                from engines.activation import prepare_activation

                self._prepared[recipe] = prepare_activation(self.spec, r, self.calibration(), self.cache,
                                                            self.threads)
            else:
                self._prepared[recipe] = prepare_fr(self.spec, r, self.cache)
            if self.precision == "int8":  # the agent's `scoring.precision: int8` graph and calibration
                self._prepared[recipe] = int8_calibration(self.det).prepare(
                    self._prepared[recipe])
        return self._prepared[recipe]

    def trunk(self, recipe: str) -> SharedTrunk:
        """The shared-trunk graph on ONNX Runtime (CPU), the same numbers on every machine."""
        if recipe not in self._trunks:
            self._trunks[recipe] = SharedTrunk(OnnxRuntimeBackend(self.prepared(recipe).pair, self.threads))
        return self._trunks[recipe]

    def prefiqs(self, faces: Faces, recipe: str) -> np.ndarray:
        """PreFIQs quality of every face under `recipe` (cached per face key)."""
        todo = [i for i, k in enumerate(faces.keys) if (recipe, k) not in self._quality]
        if todo:
            trunk, bar = self.trunk(recipe), Progress(f"PreFIQs {recipe}", len(todo))
            for s in range(0, len(todo), BATCH):
                idx = todo[s : s + BATCH]
                f = trunk.forward(preprocess([faces.crops[i] for i in idx], self.spec))
                q, _, dense = prefiqs(f.dense, f.twin)
                for j, (i, qi, e) in enumerate(zip(idx, q, dense, strict=True)):
                    self._quality[(recipe, faces.keys[i])] = float(qi)
                    self._dense.setdefault(faces.keys[i], e)
                    self._stats.setdefault(faces.keys[i], {k: v[j] for k, v in f.stats.items()})
                bar(len(idx))
            bar.close()
        return np.array([self._quality[(recipe, k)] for k in faces.keys])

    def dense(self, faces: Faces, recipe: str) -> np.ndarray:
        """The scoring model's normalised embeddings (a by-product of any recipe's PreFIQs pass)."""
        self.prefiqs(faces, recipe)
        return np.stack([self._dense[k] for k in faces.keys])

    def evidence(self, faces: Faces, recipe: str) -> Evidence:
        """What the scorer's pass knows of each face (drift, dense embedding, activation statistics, detection,
        brightness)."""
        q = self.prefiqs(faces, recipe)
        stats = {k: np.stack([self._stats[key][k] for key in faces.keys]) for k in self._stats[faces.keys[0]]}
        return Evidence(2.0 * (1.0 - q), self.dense(faces, recipe), stats, np.array(faces.cheap["detector"]),
                        np.array(faces.cheap["size"]), face_brightness(faces.crops))

    def selection(self, recipe: str) -> SelectionScore:
        """The selection score the agent would use (built-in ERS and calibration; the shipped weights)."""
        if self._selection is None:
            scorer = Scorer(self.spec, self.trunk(recipe), BATCH)
            self._selection = ensure_selection(scorer, self.prepared(recipe), self.ers(recipe), "fused",
                                               lambda s: calibration_faces(s.spec, self.det), self.det.kind)
        return self._selection

    def cues(self, faces: Faces, recipe: str) -> dict[str, np.ndarray]:
        """Each selection cue on the calibration's scale (agent/quality/selection.py)."""
        sel = self.selection(recipe)
        return sel.scale(raw_cues(self.evidence(faces, recipe), sel.ers, sel.calibration.reference))

    def methods(self, faces: Faces, recipes: Sequence[str], seed: int, fusion: bool = True) -> dict[str, np.ndarray]:
        """Every method's quality per face: the selection score (first recipe) and each of its activation cues,
        PreFIQs per recipe, random, the cheap signals, and (with `fusion`) the built-in ERS of the dense embeddings
        (ers_builtin.py: calibrated on packaged images, not on LFW) and rank fusions of the first recipe with size,
        sharpness, both, the detector score, and ERS."""
        out = {}
        if recipes:
            out["selection score (fused)"] = self.selection(recipes[0])(self.evidence(faces, recipes[0]))[0]
            cues = self.cues(faces, recipes[0])
            out.update({f"cue {k}": cues[k] for k in STATS_CUES if k in cues})
        out.update({f"PreFIQs {r}": self.prefiqs(faces, r) for r in recipes})
        out["random"] = random_quality(len(faces), seed)
        out.update({k: np.array(v) for k, v in faces.cheap.items()})
        if fusion and recipes:
            out["ERS (built-in)"] = self.ers(recipes[0]).scores(self.dense(faces, recipes[0]))
            p = out[f"PreFIQs {recipes[0]}"]
            for extra in (("size",), ("sharpness",), ("size", "sharpness"), ("detector",), ("ERS (built-in)",)):
                out[f"fusion PreFIQs {recipes[0]} + {' + '.join(extra)}"] = rank_fusion(p, *(out[e] for e in extra))
        return out

    def ers(self, recipe: str) -> ErsModel:
        """The built-in ERS of the scoring model (the recipe only supplies the dense pass): the one the agent saved
        beside the model, else built now with this run's detector (and saved, as the agent does). A saved LFW
        calibration (`bestshot ers calibrate`) is not used: it has seen the evaluation's faces."""
        if self._ers is None:
            scorer, prepared = Scorer(self.spec, self.trunk(recipe), BATCH), self.prepared(recipe)
            det = self.det
            saved = load_ers(prepared)
            if saved is None or saved.info.get("source") == "builtin":
                # None when it cannot be built: building again raises, naming why
                self._ers = ensure_ers(scorer, prepared, det) or builtin_ers(scorer, det)
            else:
                self._ers = builtin_ers(scorer, det)
        return self._ers


# ---------------------------------------------------------------- pairs


@dataclass
class PairSet:
    """Comparisons of one protocol: genuine (ref, probe) face indices; impostors = every reference against every
    probe of another identity (`refs`, `probes`: the unique face indices on each side, from all pairs)."""

    name: str
    ref: np.ndarray
    probe: np.ndarray
    refs: np.ndarray
    probes: np.ndarray

    def scores(self, emb: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(genuine scores, impostor scores) under L2-normalised embeddings."""
        genuine = np.sum(emb[self.ref] * emb[self.probe], axis=1)
        sim = emb[self.refs] @ emb[self.probes].T
        return genuine, sim[ids[self.refs][:, None] != ids[self.probes][None, :]]


def pair_faces(ev: Evaluator, pairs: Sequence[tuple[LfwImage, LfwImage]], seed: int, variants: int = 1,
               label: str = "pair faces") -> tuple[Faces, list[PairSet]]:
    """Faces of the clean and the degraded protocol over `pairs`; genuine = the pairs of one person. With
    `variants` > 1 each probe is degraded that many times (independent draws), each a genuine comparison."""
    plan = []
    for i, (a, b) in enumerate(pairs):
        rng = np.random.default_rng([seed, i])
        ref, probe = (a, b) if rng.random() < 0.5 else (b, a)
        plan.append((ref, probe, [random_degradation(rng) for _ in range(variants)]))
    clean = sorted({x for r, p, _ in plan for x in (r, p)}, key=lambda x: x.key)

    def items() -> Iterator[Item]:
        for im in clean:
            yield im.key, im.person, *ev.clean(im)
        for _, p, ds in plan:
            for d in ds:
                yield f"{p.key}|{d}", p.person, *ev.degraded(p, [d])

    faces = ev.faces(items(), label, len(clean) + len(pairs) * variants)
    at = faces.index()
    refs = np.unique([at[r.key] for r, _, _ in plan])
    gen = [(r, p, ds) for r, p, ds in plan if r.person == p.person]
    clean_set = PairSet("clean", np.array([at[r.key] for r, _, _ in gen]), np.array([at[p.key] for _, p, _ in gen]),
                        refs, np.unique([at[p.key] for _, p, _ in plan]))
    deg = np.array([(at[r.key], at[f"{p.key}|{d}"]) for r, p, ds in gen for d in ds]).reshape(-1, 2)
    deg_set = PairSet("degraded", deg[:, 0], deg[:, 1], refs,
                      np.unique([at[f"{p.key}|{d}"] for _, p, ds in plan for d in ds]))
    return faces, [clean_set, deg_set]


def curve(genuine: np.ndarray, quality: np.ndarray, threshold: float) -> tuple[dict, np.ndarray]:
    """The EDC at the DISCARD points and its pAUC with its spread over bootstrap resamples of the genuine
    comparisons; and those resampled pAUCs (the same resamples for every method)."""
    e, boot = edc(genuine, quality, threshold), bootstrap_pauc(genuine, quality, threshold, PAUC_LIMIT)
    return {"pauc": round(e.pauc(PAUC_LIMIT), 6), "relative_pauc": round(e.relative_pauc(PAUC_LIMIT), 4),
            "pauc_std": round(float(boot.std()), 6), "fnmr": [round(float(v), 5) for v in e.at(DISCARD)]}, boot


def pair_results(ev: Evaluator, faces: Faces, sets: Sequence[PairSet], methods: dict[str, np.ndarray],
                 recipe: str, fmrs: Sequence[float] = FMRS) -> dict:
    """EDC of every method (and the oracle: pair quality = the comparison score itself) per protocol, comparison
    model and FMR, with `p_first_better`: the share of bootstrap resamples in which the first method's pAUC is
    lower. `recipe` only names the PreFIQs pass whose dense embeddings give the scoring model's scores."""
    ids = np.array(faces.ids)
    models = {ev.spec.name: ev.dense(faces, recipe), ev.other_spec.name: faces.other_emb()}
    res: dict = {}
    for ps in sets:
        for model, emb in models.items():
            genuine, impostor = ps.scores(emb, ids)
            entry = {"genuine": len(genuine), "impostor": len(impostor), "fmr": {}}
            for fmr in fmrs:
                thr = threshold_at_fmr(impostor, fmr)
                curves, boots = {}, {}
                for name, q in methods.items():
                    curves[name], boots[name] = curve(genuine, pair_quality(q[ps.ref], q[ps.probe]), thr)
                curves["oracle"], boots["oracle"] = curve(genuine, genuine, thr)
                first = next(iter(methods))  # paired bootstrap: how often the first method beats each one
                for name, c in curves.items():
                    c["p_first_better"] = round(float(np.mean(boots[first] < boots[name])), 3)
                entry["fmr"][f"{fmr:g}"] = {"threshold": thr, "supported": fmr_supported(len(impostor), fmr),
                                            "methods": curves}
            res.setdefault(ps.name, {})[model] = entry
    return res


# ---------------------------------------------------------------- tracks


@dataclass
class TrackSet:
    """Tracks (face indices per track) with each frame's utility: cosine to the track's enrolment under the other
    FR model."""

    name: str
    faces: Faces
    tracks: list[np.ndarray]
    utility: np.ndarray
    labels: list[str]
    kinds: np.ndarray | None = None  # per face, the degradation drawn on top of the pose warp (synthetic tracks)


def enrolments(ev: Evaluator, people: Sequence[str], index: int, name: str) -> np.ndarray:
    """The other FR model's embeddings of each person's photo number `index` (clean): the tracks' enrolments."""
    items = ((im.key, p, *ev.clean(im)) for p in people for im in [person_images(ev.lfw, p)[index]])
    return ev.faces(items, f"{name} enrolments", len(people)).other_emb()


def synthetic_tracks(ev: Evaluator, people: Sequence[str], seed: int, frames: int = 10,
                     name: str = "synthetic") -> TrackSet:
    """Per person: the first image, degraded per frame by a pose-like warp (severity U(0, 0.5)) then one of two
    kinds drawn for the track (severity U(0, 1)); the enrolment is the person's second image (clean)."""

    def frame_items() -> Iterator[Item]:
        for p in people:
            src = person_images(ev.lfw, p)[0]
            rng = np.random.default_rng([seed, zlib.crc32(p.encode())])
            kinds = rng.choice(KINDS, 2, replace=False)
            for t in range(frames):
                ds = [Degradation("pose", float(rng.uniform(0, 0.5)), int(rng.integers(2**31))),
                      Degradation(str(rng.choice(kinds)), float(rng.uniform(0, 1)), int(rng.integers(2**31)))]
                yield f"{src.key}|{t}|{ds[0]}|{ds[1]}", p, *ev.degraded(src, ds)

    enrol = enrolments(ev, people, 1, name)
    faces = ev.faces(frame_items(), f"{name} frames", len(people) * frames)
    tracks = [np.arange(i * frames, (i + 1) * frames) for i in range(len(people))]
    utility = np.concatenate([faces.other_emb()[t] @ enrol[i] for i, t in enumerate(tracks)])
    kinds = np.array([k.split("|")[3].split(":")[0] for k in faces.keys])
    return TrackSet(name, faces, tracks, utility, list(people), kinds)


NATURAL_MIN_PHOTOS = 4  # an enrolment and a track of 3 or more frames


def natural_tracks(ev: Evaluator, people: Sequence[str], frames: int = 10, name: str = "natural") -> TrackSet:
    """Per person with 4 or more photos: the first photo (clean) is the enrolment, the next `frames` photos are the
    track's frames, as they are. What varies between them is what varies between real sightings (pose,
    expression, lighting, age, camera), which the synthetic tracks do not model."""
    photos = {p: imgs for p in people if len(imgs := person_images(ev.lfw, p)) >= NATURAL_MIN_PHOTOS}
    people = list(photos)
    shown = {p: imgs[1 : frames + 1] for p, imgs in photos.items()}
    items = ((im.key, p, *ev.clean(im)) for p in people for im in shown[p])
    enrol = enrolments(ev, people, 0, name)
    counts = [len(shown[p]) for p in people]
    faces = ev.faces(items, f"{name} frames", sum(counts))
    ends = np.cumsum([0, *counts])
    tracks = [np.arange(a, b) for a, b in zip(ends[:-1], ends[1:], strict=True)]
    utility = np.concatenate([faces.other_emb()[t] @ enrol[i] for i, t in enumerate(tracks)])
    return TrackSet(name, faces, tracks, utility, list(people))


def demo_enrolments(folder: Path) -> dict[str, Path]:
    """The demo clip's source photos, written to `folder` (the utility of a demo frame is its similarity to the
    photo it was made from: an upper bound of real enrolment, but it ranks the frames of a track fairly)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for p in people():
        out[p.name] = folder / f"{p.name}.png"
        cv2.imwrite(str(out[p.name]), p.image)
    return out


def video_tracks(ev: Evaluator, video: Path, enrolments: dict[str, Path], threshold: float = 0.25,
                 min_frames: int = 5) -> TrackSet:
    """Detect and track the clip; a track is kept when its mean embedding (other model) is at least `threshold`
    similar to an enrolment image (the most similar one names it) and it has `min_frames` frames or more."""
    import av

    detector = make_detector(ev.det)
    enrol_items = []
    for n, path in enrolments.items():
        image = cv2.imread(str(path))
        if image is None:
            raise FileNotFoundError(f"enrolment image {path} not found or unreadable")
        dets = detector.detect(image)
        if not dets:
            raise ValueError(f"enrolment image {path}: no face found")
        enrol_items.append((n, n, image, max(dets, key=lambda d: d.size)))
    enrol = ev.faces(enrol_items, "enrolments", len(enrol_items)).other_emb()

    def frames() -> Iterator[tuple[int, float, np.ndarray]]:
        with av.open(str(video)) as c:
            for i, f in enumerate(c.decode(video=0)):
                yield i, float(f.time or 0.0), f.to_ndarray(format="bgr24")

    with av.open(str(video)) as c:
        total = c.streams.video[0].frames
    tracker, seen, bar = Tracker(), [], Progress(f"detect+track {video.name}", total)
    for i, t, image in frames():
        seen += [(i, f.track_id, f.det) for f in tracker.update(detector.detect(image), t).active]
        bar()
    bar.close()
    by_frame: dict[int, list[tuple[int, Detection]]] = {}
    for i, tid, det in seen:
        by_frame.setdefault(i, []).append((tid, det))
    items = ((f"{video.stem}/{i}/{tid}", f"track{tid}", image, det)
             for i, _, image in frames() for tid, det in by_frame.get(i, []))
    faces = ev.faces(items, f"{video.name} faces", len(seen))
    emb, ids = faces.other_emb(), np.array(faces.ids)
    tracks, labels, utility = [], [], np.zeros(len(faces))
    for tid in sorted(set(ids), key=lambda s: int(s[5:])):
        idx = np.flatnonzero(ids == tid)
        sim = enrol @ l2n(emb[idx].mean(0, keepdims=True))[0]
        if len(idx) >= min_frames and sim.max() >= threshold:
            tracks.append(idx)
            labels.append(f"{tid}={list(enrolments)[int(sim.argmax())]}")
            utility[idx] = emb[idx] @ enrol[int(sim.argmax())]
    log.info("%s: %d tracks, %d assigned to an enrolment: %s", video.name, len(set(ids)), len(tracks), labels)
    return TrackSet(video.stem, faces, tracks, utility, labels)


def selection(ts: TrackSet, q: np.ndarray) -> dict[str, float]:
    """Utility of the frame each track's highest quality picks: mean, minus random's (the track mean), the gap to
    the oracle, the gain normalised to 0 = random and 1 = oracle (with its spread over bootstrap resamples of the
    tracks), and the mean within-track Spearman(q, u)."""
    sel, orc, rnd, rho = [], [], [], []
    for idx in ts.tracks:
        u, qq = ts.utility[idx], q[idx]
        sel.append(u[int(np.argmax(qq))])
        orc.append(u.max())
        rnd.append(u.mean())
        if len(idx) >= 3 and np.ptp(qq) > 0 and np.ptp(u) > 0:
            rho.append(spearmanr(qq, u).statistic)
    sel, orc, rnd = np.array(sel), np.array(orc), np.array(rnd)
    s, o, r = float(sel.mean()), float(orc.mean()), float(rnd.mean())
    boot = np.random.default_rng(0).integers(0, len(sel), (200, len(sel)))  # resampled tracks, same for all methods
    gains = (sel[boot].mean(1) - rnd[boot].mean(1)) / np.maximum(orc[boot].mean(1) - rnd[boot].mean(1), 1e-12)
    return {"utility": round(s, 4), "vs_random": round(s - r, 4), "regret": round(o - s, 4),
            "gain": round((s - r) / (o - r), 4) if o > r else float("nan"), "gain_sd": round(float(gains.std()), 4),
            "spearman": round(float(np.mean(rho)), 4) if rho else float("nan")}


def track_results(ts: TrackSet, methods: dict[str, np.ndarray]) -> dict:
    """Selection metrics per method; for synthetic tracks also Spearman(quality, utility) over all frames pooled,
    per degradation kind (where a method is blind)."""
    res = {name: selection(ts, q) for name, q in methods.items()}
    res["oracle"] = selection(ts, ts.utility)
    out = {"tracks": len(ts.tracks), "frames": int(sum(len(t) for t in ts.tracks)), "labels": ts.labels,
           "oracle_utility": res["oracle"]["utility"], "random_utility": round(res["oracle"]["utility"]
                                                                             - res["oracle"]["vs_random"], 4),
           "methods": res}
    if ts.kinds is not None:
        groups = {"all": np.ones(len(ts.kinds), bool)} | {k: ts.kinds == k for k in sorted(set(ts.kinds))}
        out["spearman_by_kind"] = {name: {k: round(float(spearmanr(q[m], ts.utility[m]).statistic), 3)
                                          for k, m in groups.items()} for name, q in methods.items()}
    return out


def clean_shots(ts: TrackSet, methods: dict[str, np.ndarray], truth: dict) -> dict:
    """The demo clip: per method, the frame it picks per track and how many of them the clip's record marks clean
    (no blur, noise, darkening or occlusion, fully in view: where the best shot should come from). A track's face
    in a frame is the record's face of the person its label names (one per frame in the demo)."""
    people = [label.split("=", 1)[1] for label in ts.labels]
    out = {}
    for name, q in {**methods, "oracle": ts.utility}.items():
        frames, clean = [], 0
        for idx, person in zip(ts.tracks, people, strict=True):
            frame = int(ts.faces.keys[idx[int(np.argmax(q[idx]))]].split("/")[1])
            marks = [f["clean"] for f in truth["faces"][frame] if f["person"] == person]
            frames.append(frame)
            clean += len(marks) == 1 and bool(marks[0])
        out[name] = {"frames": frames, "clean": clean}
    return out


# ---------------------------------------------------------------- outputs


def _style(name: str, i: int) -> dict:
    import matplotlib

    if name == "oracle":
        return {"color": "black", "linestyle": ":", "linewidth": 2}
    if name == "random":
        return {"color": "grey", "linestyle": "--"}
    style = "-" if name.startswith("PreFIQs") else "-." if name.startswith("fusion") else "--"
    return {"color": matplotlib.colormaps["tab20"](i % 20), "linestyle": style,
            "linewidth": 2 if name.startswith("PreFIQs") else 1.3}


def plot_edc(curves: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.5))
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(DISCARD, c["fnmr"], label=f"{name} (pAUC {c['pauc']:.4f})", **_style(name, i))
    ax.axvline(PAUC_LIMIT, color="lightgrey", linewidth=1)
    ax.set(xlabel="fraction of genuine comparisons discarded (lowest pair quality first)", ylabel="FNMR",
           title=title, xlim=(0, DISCARD[-1]), ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tracks(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 5 * len(results)), squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], results.items(), strict=True):
        methods = [m for m in r["methods"] if m not in ("oracle", "random")]
        ax.barh(methods, [r["methods"][m]["gain"] for m in methods], xerr=[r["methods"][m]["gain_sd"] for m in methods],
                color=["tab:blue" if m.startswith("PreFIQs") else "tab:orange" for m in methods], ecolor="grey")
        ax.axvline(0, color="grey")
        ax.set(xlabel="selection gain (0 = random frame, 1 = oracle frame; bars: bootstrap sd over tracks)",
               title=f"{name}: {r['tracks']} tracks")
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(v: float, nd: int = 4) -> str:
    return "n/a" if v is None or v != v else f"{v:.{nd}f}"


def pairs_markdown(res: dict) -> str:
    lines = []
    for proto, models in res["protocols"].items():
        for model, e in models.items():
            f3, f4 = e["fmr"].get("0.001"), e["fmr"].get("0.0001")
            first = next(iter(f3["methods"]))
            lines += [f"#### {proto} protocol, {model} comparison scores ({e['genuine']} genuine, "
                      f"{e['impostor']:,} impostor comparisons; threshold at FMR 1e-3 = {f3['threshold']:.4f})", "",
                      f"| method | FNMR 0 % | 10 % | 20 % | 30 % | pAUC 30 % ± sd | / random | P({first} better) "
                      "| pAUC 30 % @ FMR 1e-4 | / random |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for m in sorted(f3["methods"], key=lambda m: f3["methods"][m]["pauc"]):
                c = f3["methods"][m]
                fn = [c["fnmr"][int(round(d * 100))] for d in (0, 0.1, 0.2, 0.3)]
                c4 = f4["methods"][m] if f4 and f4["supported"] else None
                tail = f"{_f(c4['pauc'])} | {_f(c4['relative_pauc'], 3)}" if c4 else "n/a | n/a"
                better = "" if m == first else f"{c['p_first_better']:.2f}"
                lines.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in fn) + f" | {_f(c['pauc'])} ± "
                             f"{_f(c['pauc_std'])} | {_f(c['relative_pauc'], 3)} | {better} | {tail} |")
            lines.append("")
    return "\n".join(lines)


def tracks_markdown(res: dict) -> str:
    lines = []
    for name, r in res["sets"].items():
        lines += [f"#### {name}: {r['tracks']} tracks, {r['frames']} frames (oracle frame utility "
                  f"{r['oracle_utility']:.4f}, random frame {r['random_utility']:.4f})", "",
                  "| method | selected utility | vs random | regret vs oracle | gain (0 random, 1 oracle) ± sd | "
                  "Spearman in track |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for m, v in sorted(r["methods"].items(), key=lambda kv: -np.nan_to_num(kv[1]["gain"], nan=-9)):
            lines.append(f"| {m} | {v['utility']:.4f} | {v['vs_random']:+.4f} | {v['regret']:.4f} | "
                         f"{_f(v['gain'], 3)} ± {_f(v['gain_sd'], 3)} | {_f(v['spearman'], 3)} |")
        lines.append("")
        if "clean_shots" in r:
            lines += ["Each method's shot per track and how many of them the clip's record marks clean:", "",
                      "| method | frames | clean |", "| --- | --- | ---: |"]
            lines += [f"| {m} | {', '.join(map(str, v['frames']))} | {v['clean']}/{len(v['frames'])} |"
                      for m, v in r["clean_shots"].items()]
            lines.append("")
        if "spearman_by_kind" in r:
            kinds = list(next(iter(r["spearman_by_kind"].values())))
            lines += [f"Spearman(quality, utility) over the {name} frames pooled, by the degradation on top of the "
                      "pose warp:", "", "| method | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
            lines += [f"| {m} | " + " | ".join(_f(v[k], 3) for k in kinds) + " |"
                      for m, v in r["spearman_by_kind"].items()]
            lines.append("")
    return "\n".join(lines)


def _write(out: Path, stem: str, res: dict, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / f"{stem}.md").write_text(md + "\n")
    log.info("wrote %s/%s.json, %s.md and the plots", out, stem, stem)


# ---------------------------------------------------------------- drivers


def _subset(pairs: list, limit: int | None, seed: int) -> list:
    """At most `limit` matched and `limit` mismatched pairs (a seeded choice, original order)."""
    if limit is None:
        return pairs
    rng, keep = np.random.default_rng(seed), []
    for same in (True, False):
        idx = [i for i, (a, b) in enumerate(pairs) if (a.person == b.person) == same]
        keep += list(rng.permutation(idx)[:limit])
    return [pairs[i] for i in sorted(keep)]


def eval_pairs(out: Path, recipes: Sequence[str], lfw: Path = LFW, other_model: Path = OTHER_MODEL,
               lightqnet: Path = LIGHTQNET, seed: int = 0, limit: int | None = None, threads: int | None = None,
               cache: Path | None = None, precision: str = "fp32", detector: DetectorSpec | None = None) -> dict:
    """EDC / pAUC of PreFIQs (each recipe) and the baselines on the LFW test pairs, clean and degraded protocols,
    scores from the scoring model and from `other_model`. Writes pairs.json, pairs.md and edc_*.png under `out`.
    `limit`: at most that many matched and mismatched pairs (a quick run). `detector`: the detector's kind and model
    (default: CenterFace)."""
    t0 = time.monotonic()
    ev = Evaluator(lfw, other_model, lightqnet, threads, cache, precision, detector)
    pairs = _subset(lfw_split(lfw)[0], limit, seed)
    faces, sets = pair_faces(ev, pairs, seed)
    methods = ev.methods(faces, recipes, seed)
    res = {"config": {"recipes": list(recipes), "precision": precision, "detector": ev.det.kind, "seed": seed,
                      "pairs": len(pairs),
                      "faces": len(faces),
                      "scoring_model": ev.spec.name, "other_model": ev.other_spec.name, "pauc_limit": PAUC_LIMIT,
                      "discard": DISCARD.tolist()},
           "protocols": pair_results(ev, faces, sets, methods, recipes[0])}
    out.mkdir(parents=True, exist_ok=True)
    for proto, models in res["protocols"].items():
        for model, e in models.items():
            for fmr, f in e["fmr"].items():
                if f["supported"] or fmr == f"{FMRS[0]:g}":
                    plot_edc(f["methods"], f"EDC, LFW DevTest {proto}, {model} scores, FMR {fmr}",
                             out / f"edc_{proto}_{model}_fmr{fmr}.png")
    res["seconds"] = round(time.monotonic() - t0, 1)
    _write(out, "pairs", res, pairs_markdown(res))
    return res


def eval_tracks(out: Path, recipes: Sequence[str], lfw: Path = LFW, video: Path | None = VIDEO,
                enrolments: dict[str, Path] | None = None, other_model: Path = OTHER_MODEL,
                lightqnet: Path = LIGHTQNET, seed: int = 0, synthetic: int = 120, frames: int = 10,
                threads: int | None = None, cache: Path | None = None, demo: bool = False,
                precision: str = "fp32", detector: DetectorSpec | None = None, natural: int | None = None) -> dict:
    """Best-shot selection: per method, the utility of the frame it picks per track, on `synthetic` LFW tracks of
    `frames` frames (test-split people), on natural LFW tracks of up to `frames` photos (`natural` test-split
    people with 4+ photos, seeded choice; None: all of them, 0: none), on the real clip `video` (None: skip) with
    its enrolment images and, with `demo`, on the embedded demo clip with its two source photos as enrolments.
    Writes tracks.json, tracks.md and tracks.png under `out`. `detector`: as for `eval_pairs`."""
    t0 = time.monotonic()
    ev = Evaluator(lfw, other_model, lightqnet, threads, cache, precision, detector)
    pairs = lfw_split(lfw)[0]
    people = sorted({a.person for a, b in pairs if a.person == b.person})
    people = sorted(np.random.default_rng(seed).permutation(people)[:synthetic].tolist())
    sets = [synthetic_tracks(ev, people, seed, frames)]
    if natural != 0:
        many = sorted({x.person for pair in pairs for x in pair
                       if len(person_images(ev.lfw, x.person)) >= NATURAL_MIN_PHOTOS})
        if natural is not None:
            many = sorted(np.random.default_rng(seed).permutation(many)[:natural].tolist())
        sets.append(natural_tracks(ev, many, frames))
    if video is not None:
        sets.append(video_tracks(ev, video, enrolments or ENROLMENTS))
    demo_set: TrackSet | None = None
    if demo:
        clip = demo_clip_path()
        sets.append(demo_set := video_tracks(ev, clip, demo_enrolments(out / "demo-enrolments")))
    res = {"config": {"recipes": list(recipes), "precision": precision, "detector": ev.det.kind, "seed": seed,
                      "synthetic": len(people), "natural": natural,
                      "frames": frames,
                      "video": str(video) if video else None, "utility_model": ev.other_spec.name},
           "sets": {}}
    for ts in sets:
        methods = ev.methods(ts.faces, recipes, seed)
        res["sets"][ts.name] = track_results(ts, methods)
        if ts is demo_set:
            res["sets"][ts.name]["clean_shots"] = clean_shots(ts, methods, load_truth(clip))
    out.mkdir(parents=True, exist_ok=True)
    plot_tracks(res["sets"], out / "tracks.png")
    res["seconds"] = round(time.monotonic() - t0, 1)
    _write(out, "tracks", res, tracks_markdown(res))
    return res
