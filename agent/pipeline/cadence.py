"""When a camera's frame goes to the detector: every `detect_every`th frame the worker takes, and on an empty, still
scene less often. Frames are counted here, not by their decoder index: a source's frame-rate cap or a dropped frame
leaves gaps in the index (a 30 fps camera capped at 15 fps delivers only even indices, which "every 2nd index" would
detect one and all).

With `idle_every_s` set, a frame of a camera with no open track (confirmed, lost or tentative) is detected only
when a cheap motion test fires (a 64x36 grey thumbnail against the one at the last detection: a share of its
pixels changed by more than 12 grey levels) or `idle_every_s` has passed since the last detection. A face that
enters a scene moves it, so its track starts at the next detection slot as before; the stated bound for a face
that appears without any motion is `idle_every_s` (plus one `detect_every` period).
"""

from __future__ import annotations

import cv2
import numpy as np

THUMB = (64, 36)
LEVELS = 12  # grey-level change of a thumbnail pixel (a 10x10 block's mean at 640x360) that counts as motion


class Cadence:
    def __init__(self, every: int = 1, idle_every_s: float | None = None, motion_area: float = 0.002):
        self.every, self.idle_every_s, self.motion_area = every, idle_every_s, motion_area
        self._ref: np.ndarray | None = None  # thumbnail at the last detection on an idle scene
        self._last: float | None = None  # pts of the last detection
        self._seen = 0  # frames offered
        self.idle_skipped = 0  # frames not detected because the scene was empty and still

    def due(self, pts: float, image: np.ndarray, busy: bool) -> bool:
        """Whether the next frame the worker took (at `pts`) is detected; `busy`: the camera has open tracks."""
        self._seen += 1
        if (self._seen - 1) % self.every:
            return False
        if self.idle_every_s is None or busy:
            self._ref, self._last = None, pts  # the first idle frame after tracks is detected and is the reference
            return True
        grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        thumb = cv2.resize(grey, THUMB, interpolation=cv2.INTER_AREA).astype(np.int16)
        moved = self._ref is None or float(np.mean(np.abs(thumb - self._ref) > LEVELS)) >= self.motion_area
        if moved or pts - self._last >= self.idle_every_s:
            self._ref, self._last = thumb, pts
            return True
        self.idle_skipped += 1
        return False
