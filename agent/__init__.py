"""bestshot runtime: ingest, detect, track, align, score, select, publish."""

import os

# OpenCV reads this once, on first decode: refuse images over 100 MP instead of allocating them.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(100_000_000))

__version__ = "0.1.0"
