"""Upstream tracks input: frames with face tracks from a pipeline that already tracks (DeepStream, Savant, ...).

The agent subscribes (ZeroMQ SUB) to the upstream publisher; by default it connects to an upstream that binds
(PUB or XPUB), with `bind=True` it binds and the upstream publishers connect to it. One multipart message per frame:

  [topic]  optional, any bytes. A message of 3 frames starts with one; a message of 2 frames has none. ZeroMQ
           matches `UpstreamOptions.topic` as a prefix of a message's first frame, so a non-empty topic
           receives only messages that carry a topic frame (e.g. topic b"cam" takes "cam1" and "cam2").
  header   JSON object (utf-8):
             "camera":   string, non-empty: the camera the frame comes from
             "frame_id": integer: the frame's number in that camera's stream (becomes Frame.index)
             "pts":      number: presentation time in seconds
             "tracks":   list, possibly empty, of objects:
                           "id":        integer: track id, stable over the frames of one camera
                           "box":       [x1, y1, x2, y2] in the image's pixels, x1 < x2, y1 < y2
                           "score":     number, optional, default 1.0: detection confidence
                           "landmarks": [[x, y] * 5], optional: right eye (image-left), left eye, nose tip,
                                        right mouth corner, left mouth corner (ArcFace order)
             "encoding": "jpeg" | "raw"
             "shape":    [height, width, 3], integers: required for "raw"
           Other keys are ignored.
  image    "jpeg": a JPEG file's bytes (any image OpenCV decodes is taken; it is read as 3-channel BGR).
           "raw": height * width * 3 bytes, uint8 BGR, rows top to bottom, C order.

A message that breaks any rule above (frame count, JSON, a missing key or wrong type, an image that does not decode
or a raw size that does not match its shape, a bad track) is skipped whole, counted in `malformed` and logged as
an ERROR naming the cause; the source keeps receiving. `received` counts every message taken off the socket.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import zmq

from agent.types import Detection, Frame, TrackedFace

log = logging.getLogger(__name__)

HEADER_KEYS = ("camera", "frame_id", "pts", "tracks", "encoding")


class Malformed(ValueError):
    """A message that breaks the wire format; its text names the cause."""


@dataclass
class UpstreamOptions:
    endpoint: str  # e.g. "tcp://127.0.0.1:5600"
    bind: bool = False  # False: connect to the upstream publisher; True: bind, publishers connect
    topic: bytes = b""  # SUB prefix filter on a message's first frame (see the module docstring)
    poll_ms: int = 200  # longest wait for a message before checking for stop()
    hwm: int = 100  # messages queued for this subscriber; ZeroMQ drops newer ones beyond it


def _need(ok: bool, cause: str) -> None:
    if not ok:
        raise Malformed(cause)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _floats(value: object, shape: tuple[int, ...], cause: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise Malformed(cause) from None
    _need(array.shape == shape and bool(np.isfinite(array).all()), cause)
    return array


def _track(track: object, where: str) -> TrackedFace:
    _need(isinstance(track, dict), f"{where} is not an object")
    _need(_is_int(track.get("id")), f"{where}.id must be an integer")
    box = _floats(track.get("box"), (4,), f"{where}.box must be [x1, y1, x2, y2]")
    _need(bool(box[0] < box[2] and box[1] < box[3]), f"{where}.box {box.tolist()} needs x1 < x2 and y1 < y2")
    score = track.get("score", 1.0)
    _need(_is_number(score), f"{where}.score must be a number")
    landmarks = track.get("landmarks")
    if landmarks is not None:
        landmarks = _floats(landmarks, (5, 2), f"{where}.landmarks must be five [x, y] points")
    return TrackedFace(track["id"], Detection(box, float(score), landmarks))


def _image(encoding: object, shape: object, payload: bytes) -> np.ndarray:
    if encoding == "jpeg":
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR) if payload else None
        _need(image is not None, f"JPEG image of {len(payload)} bytes does not decode")
        return image
    _need(encoding == "raw", f"encoding {encoding!r} is neither 'jpeg' nor 'raw'")
    _need(isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape)
          and shape[2] == 3, f"raw image needs shape [height, width, 3], got {shape!r}")
    size = math.prod(shape)
    _need(len(payload) == size, f"raw image is {len(payload)} bytes, shape {shape} needs {size}")
    return np.frombuffer(payload, np.uint8).reshape(shape).copy()


def decode_message(parts: Sequence[bytes], wall_time: float = 0.0) -> tuple[Frame, list[TrackedFace]]:
    """One wire message ([topic,] header, image) as a Frame and its tracks; raises Malformed naming the cause."""
    _need(len(parts) in (2, 3), f"{len(parts)} message frames, expected [topic,] header, image")
    try:
        header = json.loads(parts[-2])
    except ValueError as exc:
        raise Malformed(f"header is not JSON: {exc}") from None
    _need(isinstance(header, dict), "header is not a JSON object")
    missing = [key for key in HEADER_KEYS if key not in header]
    _need(not missing, f"header lacks {', '.join(missing)}")
    camera, frame_id, pts, tracks = header["camera"], header["frame_id"], header["pts"], header["tracks"]
    _need(isinstance(camera, str) and bool(camera), "camera must be a non-empty string")
    _need(_is_int(frame_id), "frame_id must be an integer")
    _need(_is_number(pts), "pts must be a number")
    _need(isinstance(tracks, list), "tracks must be a list")
    faces = [_track(track, f"tracks[{i}]") for i, track in enumerate(tracks)]
    image = _image(header["encoding"], header.get("shape"), parts[-1])
    return Frame(camera, frame_id, float(pts), image, wall_time), faces


class UpstreamSource:
    """Frames and tracks from an upstream tracker over ZeroMQ; iterate `frames()`, end it with `stop()`."""

    def __init__(self, options: UpstreamOptions, context: zmq.Context | None = None) -> None:
        self.options = options
        self.received = 0  # messages taken off the socket
        self.malformed = 0  # of those, skipped as malformed
        self._context = context or zmq.Context.instance()
        self._stopping = threading.Event()

    def frames(self) -> Iterator[tuple[Frame, list[TrackedFace]]]:
        """(Frame, tracks) per well-formed message, in arrival order, until `stop()`; the socket lives in here."""
        opts = self.options
        sock = self._context.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, opts.hwm)
            sock.setsockopt(zmq.SUBSCRIBE, opts.topic)
            (sock.bind if opts.bind else sock.connect)(opts.endpoint)
            log.info("upstream: %s %s", "bound to" if opts.bind else "connected to", opts.endpoint)
            while not self._stopping.is_set():
                if not sock.poll(opts.poll_ms):
                    continue
                parts = sock.recv_multipart()
                self.received += 1
                try:
                    item = decode_message(parts, time.time())
                except Malformed as exc:
                    self.malformed += 1
                    if self.malformed <= 10 or self.malformed % 100 == 0:  # a broken upstream must not flood the log
                        log.error("upstream %s: malformed message skipped (%d so far): %s",
                                  opts.endpoint, self.malformed, exc)
                    continue
                yield item
        finally:
            sock.close()

    def stop(self) -> None:
        """End `frames()` within `poll_ms`; returns at once."""
        self._stopping.set()
