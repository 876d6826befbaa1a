"""Reading still images robustly (any failure becomes one ImageError that names the file and the cause), and the
one measure of an aligned face crop that both the gate and the scorer take."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".jp2"}


class ImageError(Exception):
    """An input image that cannot be used, with the reason."""


def read_image(path: Path) -> np.ndarray:
    """Decode a file to 8-bit BGR (grey, 16-bit, RGBA and CMYK inputs are converted)."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}") from e
    if data.size == 0:
        raise ImageError(f"{path}: empty file")
    return decode_image(data, str(path))


def decode_image(data: np.ndarray | bytes, name: str = "image") -> np.ndarray:
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray) else data
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # 8-bit BGR whatever the source depth/channels
    except cv2.error as e:  # OpenCV refuses images over OPENCV_IO_MAX_IMAGE_PIXELS (agent/__init__.py)
        if "MAX_IMAGE_PIXELS" in str(e):
            limit = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
            raise ImageError(f"{name}: image too large (over {limit} pixels)") from e
        raise ImageError(f"{name}: cannot decode: {e.err or e}") from e
    if img is None:
        raise ImageError(f"{name}: not a readable image (unknown format or corrupt data)")
    if img.shape[0] < 8 or img.shape[1] < 8:
        raise ImageError(f"{name}: image too small ({img.shape[1]}x{img.shape[0]})")
    return img


def expand_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given; folders walked (sorted) for image files."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p


def face_grey(crop: np.ndarray) -> float:
    """Mean grey level of an aligned crop's inner face region: rows 30-80 %, columns 25-75 % (eyes to mouth, little
    background or hair)."""
    h, w = crop.shape[:2]
    return float(crop[int(0.3 * h) : int(0.8 * h), int(0.25 * w) : int(0.75 * w)].mean(dtype=np.float32))
