"""The embedded demo clip: real face photos that move, scale and degrade over a textured background.

The photos ship inside installed packages: matplotlib's Grace Hopper and scikit-image's astronaut (Eileen
Collins).
`make_demo_clip` writes an H.264 mp4 and, beside it, a JSON ground truth (`truth_path`): per frame, the
faces shown with their box and degradation; per appearance (one track), its frames, its clean frames (sharp,
noiseless, fully lit, unoccluded, fully inside the frame), where a best shot should come from, and the
largest of those (`best_frame`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from agent.common.cache import atomic_write, cache_root, locked

log = logging.getLogger(__name__)

DEMO_VERSION = 1
BASE_SECONDS, BASE_HEIGHT = 12.0, 360  # the size SCRIPT is written for


@dataclass(frozen=True)
class Person:
    name: str
    image: np.ndarray  # the photo, BGR uint8
    face: tuple[int, int, int, int]  # face box in the photo: x1, y1, x2, y2

    @property
    def face_crop(self) -> np.ndarray:
        x1, y1, x2, y2 = self.face
        return self.image[y1:y2, x1:x2]


# The script, written for a 12 s clip 360 rows high: one row per keyframe, interpolated linearly. Columns: track,
# person (index into people()), t (s), x, y (face centre, fractions of the frame), size (face width, px), blur
# (Gaussian sigma, px), noise (sigma, grey levels), gain (brightness factor), occlusion (fraction of the face
# height covered by a bar from the chin up). A track is on screen from its first keyframe to its last.
SCRIPT = np.array(
    [
        [0, 0, 0.00, -0.05, 0.50, 80, 5, 0, 1.0, 0.0],  # enters blurred from the left
        [0, 0, 1.50, 0.25, 0.48, 140, 0, 0, 1.0, 0.0],  # clean from 1.5 to 2.75 s, growing
        [0, 0, 2.75, 0.32, 0.50, 180, 0, 0, 1.0, 0.0],
        [0, 0, 3.75, 0.38, 0.52, 150, 0, 18, 0.8, 0.0],
        [0, 0, 5.00, 0.42, 0.55, 110, 0, 30, 0.45, 0.0],  # noisy and dark
        [1, 1, 1.00, 1.08, 0.42, 130, 0, 0, 0.35, 0.0],  # enters dark from the right
        [1, 1, 1.90, 0.80, 0.42, 110, 0, 0, 1.0, 0.0],  # clean from 1.9 to 3.0 s, shrinking
        [1, 1, 3.00, 0.76, 0.45, 100, 0, 0, 1.0, 0.0],
        [1, 1, 3.90, 0.74, 0.46, 85, 0, 0, 1.0, 0.5],
        [1, 1, 4.60, 0.72, 0.47, 70, 3, 0, 1.0, 0.6],  # occluded and blurred
        [2, 1, 5.80, 0.15, 0.55, 60, 0, 28, 1.0, 0.0],  # small and noisy
        [2, 1, 7.70, 0.30, 0.50, 120, 0, 0, 1.0, 0.0],  # clean from 7.7 to 9.0 s, growing
        [2, 1, 9.00, 0.38, 0.48, 190, 0, 0, 1.0, 0.0],
        [2, 1, 10.10, 0.42, 0.48, 170, 4, 0, 1.0, 0.0],
        [2, 1, 11.20, 0.30, 0.50, 120, 7, 0, 1.0, 0.0],  # blurred
        [3, 0, 6.50, 0.92, 0.40, 90, 0, 0, 1.0, 0.55],  # occluded
        [3, 0, 8.00, 0.82, 0.42, 100, 0, 0, 1.0, 0.0],  # clean from 8.0 to 9.3 s, growing
        [3, 0, 9.30, 0.80, 0.45, 110, 0, 0, 1.0, 0.0],
        [3, 0, 10.50, 0.84, 0.45, 90, 3, 0, 0.6, 0.0],
        [3, 0, 11.60, 1.05, 0.45, 70, 3, 15, 0.5, 0.0],  # leaves blurred, dark and noisy to the right
    ]
)
PARAMS = ("x", "y", "size", "blur", "noise", "gain", "occlusion")


def people() -> list[Person]:
    """Grace Hopper (matplotlib) and the astronaut (scikit-image)."""
    from matplotlib import cbook  # imported here: both packages cost an agent start that needs no photo
    from skimage.data import astronaut

    hopper = cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return [Person("hopper", hopper, (168, 130, 362, 338)),
            Person("astronaut", np.ascontiguousarray(astronaut()[:, :, ::-1]), (172, 68, 272, 188))]


def _cutout(person: Person) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """The photo cut generously around the face, a feathered elliptic alpha, and the face box in the cutout."""
    x1, y1, x2, y2 = person.face
    w, h = x2 - x1, y2 - y1
    H, W = person.image.shape[:2]
    cx1, cy1 = max(0, round(x1 - 0.45 * w)), max(0, round(y1 - 0.45 * h))
    cx2, cy2 = min(W, round(x2 + 0.45 * w)), min(H, round(y2 + 0.35 * h))
    image = person.image[cy1:cy2, cx1:cx2]
    alpha = np.zeros(image.shape[:2], np.float32)
    ch, cw = alpha.shape
    cv2.ellipse(alpha, (cw // 2, ch // 2), (int(cw * 0.45), int(ch * 0.45)), 0, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 0.04 * cw)
    return image, alpha, (x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A muted, softly mottled wall with a vertical gradient."""
    blobs = rng.uniform(-1, 1, (6, 10, 3)).astype(np.float32) * [0.25, 0.25, 0.25] + rng.uniform(-1, 1, (6, 10, 1))
    blobs = cv2.resize(blobs.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    gradient = np.linspace(1.1, 0.8, height, dtype=np.float32)[:, None, None]
    base = np.array([150, 160, 165], np.float32) + 16 * blobs + rng.normal(0, 3, (height, width, 3)).astype(np.float32)
    return np.clip(base * gradient, 0, 255)


def _paste(canvas: np.ndarray, image: np.ndarray, alpha: np.ndarray, x: int, y: int) -> None:
    """Alpha-blend `image` onto the float canvas with its top-left at (x, y), clipped to the canvas."""
    H, W = canvas.shape[:2]
    h, w = alpha.shape
    ax1, ay1, ax2, ay2 = max(0, -x), max(0, -y), min(w, W - x), min(h, H - y)
    if ax1 >= ax2 or ay1 >= ay2:
        return
    a = alpha[ay1:ay2, ax1:ax2, None]
    region = canvas[y + ay1 : y + ay2, x + ax1 : x + ax2]
    region[:] = region * (1 - a) + image[ay1:ay2, ax1:ax2] * a


def _render_face(
    canvas: np.ndarray, rng: np.random.Generator, cut: tuple, p: dict[str, float], scale: float
) -> tuple[list[float], float]:
    """Draw one degraded face; its face box in the frame (clipped) and the fraction of the box inside."""
    image, alpha, (fx1, fy1, fx2, fy2) = cut
    H, W = canvas.shape[:2]
    s = p["size"] * scale / (fx2 - fx1)
    h, w = max(1, round(image.shape[0] * s)), max(1, round(image.shape[1] * s))
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC).astype(np.float32)
    alpha = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_LINEAR)
    bx1, by1, bx2, by2 = fx1 * s, fy1 * s, fx2 * s, fy2 * s  # face box in the scaled cutout
    x, y = round(p["x"] * W - (bx1 + bx2) / 2), round(p["y"] * H - (by1 + by2) / 2)
    if p["blur"] > 0:
        image = cv2.GaussianBlur(image, (0, 0), p["blur"] * scale)
    image *= p["gain"]
    if p["occlusion"] > 0:
        fw, fh = bx2 - bx1, by2 - by1  # a grey bar from the chin up, a little wider than the face
        left, top = max(0, round(bx1 - 0.1 * fw)), round(by2 - p["occlusion"] * fh)
        image[top : round(by2 + 0.1 * fh), left : round(bx2 + 0.1 * fw)] = 70
    if p["noise"] > 0:
        image += rng.normal(0, p["noise"], image.shape).astype(np.float32)
    _paste(canvas, np.clip(image, 0, 255), alpha, x, y)
    box = np.array([x + bx1, y + by1, x + bx2, y + by2])
    clipped = np.clip(box, 0, [W, H, W, H])
    visible = float(np.prod(clipped[2:] - clipped[:2]).clip(0) / np.prod(box[2:] - box[:2]))
    return [round(float(v), 1) for v in clipped], round(visible, 3)


def truth_path(clip: Path) -> Path:
    """Where make_demo_clip writes the ground truth of `clip`."""
    return clip.with_suffix(".json")


def make_demo_clip(
    path: Path, seconds: float = 12, fps: int = 25, size: tuple[int, int] = (640, 360), seed: int = 0
) -> Path:
    """Write the demo clip (H.264 mp4, deterministic for `seed`) to `path` and its ground truth beside it."""
    path = Path(path)
    width, height = size
    rng = np.random.default_rng(seed)
    cast = people()
    cuts = [_cutout(p) for p in cast]
    background = _background(rng, width, height)
    tscale, scale = seconds / BASE_SECONDS, height / BASE_HEIGHT
    n = round(seconds * fps)
    frames: list[list[dict]] = []
    tracks = [
        {"id": k, "person": cast[int(SCRIPT[SCRIPT[:, 0] == k][0, 1])].name, "frames": [], "clean_frames": []}
        for k in range(int(SCRIPT[:, 0].max()) + 1)
    ]

    def render(i: int) -> np.ndarray:
        canvas, faces, t = background.copy(), [], i / fps / tscale
        for track in tracks:
            keys = SCRIPT[SCRIPT[:, 0] == track["id"]]
            if not keys[0, 2] <= t < keys[-1, 2]:
                continue
            p = {name: float(np.interp(t, keys[:, 2], keys[:, j + 3])) for j, name in enumerate(PARAMS)}
            bbox, visible = _render_face(canvas, rng, cuts[int(keys[0, 1])], p, scale)
            if visible <= 0:
                continue
            clean = p["blur"] == 0 and p["noise"] == 0 and p["gain"] == 1 and p["occlusion"] == 0 and visible == 1
            face = {"track": track["id"], "person": track["person"], "bbox": bbox, "visible": visible, "clean": clean}
            faces.append(face | {k: round(p[k] * (scale if k in ("size", "blur") else 1), 3) for k in PARAMS[2:]})
            track["frames"].append(i)
            if clean:
                track["clean_frames"].append(i)
        frames.append(faces)
        return canvas.astype(np.uint8)

    def write(tmp: Path) -> None:
        with av.open(str(tmp), "w", format="mp4") as out:
            # superfast has no rc-lookahead / mb-tree: with them (veryfast and slower) x264 gave run-to-run differences
            stream = out.add_stream("libx264", rate=fps, options={"crf": "20", "preset": "superfast"})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.gop_size = fps
            for i in range(n):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(render(i), format="bgr24")))
            out.mux(stream.encode())

    path.parent.mkdir(parents=True, exist_ok=True)
    truth_file = truth_path(path)
    truth_file.unlink(missing_ok=True)
    atomic_write(path, write)
    for track in tracks:  # the largest clean view: where the best shot should come from
        size = {f["size"]: i for i in track["clean_frames"] for f in frames[i] if f["track"] == track["id"]}
        track["best_frame"] = size[max(size)] if size else None
    truth = {
        "version": DEMO_VERSION,
        "seed": seed,
        "fps": fps,
        "frames": n,
        "width": width,
        "height": height,
        "people": [p.name for p in cast],
        "tracks": tracks,
        "faces": frames,
    }
    atomic_write(truth_file, lambda tmp: tmp.write_text(json.dumps(truth, separators=(",", ":"))))
    log.info("demo clip: %d frames, %d tracks of %s -> %s", n, len(tracks), ", ".join(truth["people"]), path)
    return path


def demo_clip_path() -> Path:
    """The default demo clip in the cache (`<cache>/demo/`), made on first use; its truth is `truth_path` of it."""
    path = cache_root() / "demo" / f"demo-v{DEMO_VERSION}-{'-'.join(p.name for p in people())}.mp4"
    with locked(path):
        if not (path.is_file() and truth_path(path).is_file()):
            make_demo_clip(path)
    return path


def load_truth(clip: Path) -> dict:
    return json.loads(truth_path(clip).read_text())
