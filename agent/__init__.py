"""bestshot runtime: ingest, detect, track, align, score, select, publish."""

import os
from importlib.metadata import PackageNotFoundError, version

# OpenCV reads this once, on first decode: refuse images over 100 MP instead of allocating them.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(100_000_000))

try:
    __version__ = version("bestshot-agent")  # pyproject.toml's, as installed
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
