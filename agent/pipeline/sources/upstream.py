"""Upstream tracks input: frames with face tracks from a pipeline that already tracks (DeepStream, Savant, ...).

The agent subscribes (ZeroMQ SUB) to the upstream publisher; by default it connects to an upstream that binds
(PUB or XPUB), with `bind=True` it binds and the upstream publishers connect to it. One multipart message per frame:

  [topic]  optional, any bytes. A message of 3 frames starts with one; a message of 2 frames has none. ZeroMQ
           matches `UpstreamOptions.topic` as a prefix of a message's first frame, so a non-empty topic
           receives only messages that carry a topic frame (e.g. topic b"cam" takes "cam1" and "cam2").
  header   JSON object (utf-8):
             "camera":   string of 1 to 64 letters, digits, "_", "." or "-": the camera the frame comes from
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

Bounds (`UpstreamOptions`), each a skip of the message when broken: `max_message_bytes` (ZeroMQ's MAXMSGSIZE: a
larger message closes that peer's connection), `max_tracks` per message, `max_pixels` per image (read from the
JPEG header or the raw shape before anything is decoded), `max_cameras` distinct camera names; integers (ids,
frame numbers) and coordinates must lie within +-2^53, and a box must overlap the image. Any other exception raised
while decoding one message is a skip of that message too, logged with its type: no message can end the source.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from agent.common.keys import AllowList, check_secret_file, load_authorized_keys
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
    max_message_bytes: int = 32 << 20  # ZMQ_MAXMSGSIZE: bigger messages close the sender's connection
    max_tracks: int = 64  # tracks per message
    max_pixels: int = 16_000_000  # per decoded image (4K UHD is 8.3 million), checked before decoding
    max_cameras: int = 16  # distinct camera names on this input; messages naming a further one are skipped
    # CURVE, like the publisher's: this input is a CURVE server with this agent's secret key, and only senders
    # whose public .key file is in the folder may send (the others' handshakes are refused); both or neither.
    curve_secret_key: Path | None = None
    curve_authorized_keys_dir: Path | None = None

    def __post_init__(self) -> None:
        if (self.curve_secret_key is None) != (self.curve_authorized_keys_dir is None):
            raise ValueError("CURVE needs both curve_secret_key and curve_authorized_keys_dir")


def _need(ok: bool, cause: str) -> None:
    if not ok:
        raise Malformed(cause)


CAMERA = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a configured camera id's pattern, bounded: topics, logs, file names
LIMIT = 2**53  # integers and coordinates beyond it are not frame numbers, ids or pixels


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -LIMIT <= value <= LIMIT


def _is_number(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value) and abs(value) <= LIMIT)


def _floats(value: object, shape: tuple[int, ...], cause: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise Malformed(cause) from None
    _need(array.shape == shape and bool(np.isfinite(array).all()) and bool((np.abs(array) <= LIMIT).all()), cause)
    return array.astype(np.float32)


def jpeg_size(payload: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame marker, without decoding; None when none is found."""
    i = 2 if payload[:2] == b"\xff\xd8" else len(payload)
    while i + 9 <= len(payload):
        if payload[i] != 0xFF:
            return None
        marker = payload[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(payload[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(payload[i + 5 : i + 7], "big"), int.from_bytes(payload[i + 7 : i + 9], "big")
        i += 2 + length
    return None


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


def _image(encoding: object, shape: object, payload: bytes, max_pixels: int) -> np.ndarray:
    if encoding == "jpeg":
        size = jpeg_size(payload)
        _need(size is None or size[0] * size[1] <= max_pixels,
              f"JPEG header says {size and size[1]}x{size and size[0]}, over max_pixels {max_pixels}")
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR) if payload else None
        _need(image is not None, f"JPEG image of {len(payload)} bytes does not decode")
        return image
    _need(encoding == "raw", f"encoding {encoding!r} is neither 'jpeg' nor 'raw'")
    _need(isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape)
          and shape[2] == 3, f"raw image needs shape [height, width, 3], got {shape!r}")
    _need(shape[0] * shape[1] <= max_pixels, f"raw image {shape[1]}x{shape[0]} is over max_pixels {max_pixels}")
    size = math.prod(shape)
    _need(len(payload) == size, f"raw image is {len(payload)} bytes, shape {shape} needs {size}")
    return np.frombuffer(payload, np.uint8).reshape(shape).copy()


def decode_message(parts: Sequence[bytes], wall_time: float = 0.0, max_tracks: int = 64,
                   max_pixels: int = 16_000_000) -> tuple[Frame, list[TrackedFace]]:
    """One wire message ([topic,] header, image) as a Frame and its tracks; raises Malformed naming the cause."""
    _need(len(parts) in (2, 3), f"{len(parts)} message frames, expected [topic,] header, image")
    try:
        header = json.loads(parts[-2])
    except (ValueError, RecursionError) as exc:
        raise Malformed(f"header is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    _need(isinstance(header, dict), "header is not a JSON object")
    missing = [key for key in HEADER_KEYS if key not in header]
    _need(not missing, f"header lacks {', '.join(missing)}")
    camera, frame_id, pts, tracks = header["camera"], header["frame_id"], header["pts"], header["tracks"]
    _need(isinstance(camera, str) and CAMERA.fullmatch(camera) is not None,
          f"camera must be 1 to 64 of A-Z a-z 0-9 _ . -, got {str(camera)[:80]!r}")
    _need(_is_int(frame_id), "frame_id must be an integer")
    _need(_is_number(pts), "pts must be a number")
    _need(isinstance(tracks, list), "tracks must be a list")
    _need(len(tracks) <= max_tracks, f"{len(tracks)} tracks, over max_tracks {max_tracks}")
    faces = [_track(track, f"tracks[{i}]") for i, track in enumerate(tracks)]
    image = _image(header["encoding"], header.get("shape"), parts[-1], max_pixels)
    h, w = image.shape[:2]
    for i, f in enumerate(faces):
        x1, y1, x2, y2 = f.det.bbox
        _need(bool(x2 > 0 and y2 > 0 and x1 < w and y1 < h),
              f"tracks[{i}].box {f.det.bbox.tolist()} lies outside the {w}x{h} image")
    return Frame(camera, frame_id, float(pts), image, wall_time), faces


class UpstreamSource:
    """Frames and tracks from an upstream tracker over ZeroMQ; iterate `frames()`, end it with `stop()`."""

    def __init__(self, options: UpstreamOptions, context: zmq.Context | None = None) -> None:
        self.options = options
        self.received = 0  # messages taken off the socket
        self.malformed = 0  # of those, skipped as malformed
        self.cameras: set[str] = set()  # camera names seen (at most max_cameras)
        # keys checked now, so that a bad one fails at start, naming the file (KeyFileError)
        self._curve = None if options.curve_secret_key is None else (
            check_secret_file(options.curve_secret_key), load_authorized_keys(options.curve_authorized_keys_dir))
        # a ZAP authenticator belongs to a context: a CURVE input gets one of its own
        self._context = zmq.Context() if self._curve else (context or zmq.Context.instance())
        self._stopping = threading.Event()

    def frames(self, ticks: bool = False) -> Iterator[tuple[Frame | None, list[TrackedFace]]]:
        """(Frame, tracks) per well-formed message, in arrival order, until `stop()`; the socket lives in here.
        With `ticks`, also (None, []) after every `poll_ms` without a message (the caller's clock)."""
        opts = self.options
        auth = None
        if self._curve is not None:
            (public, secret), allowed = self._curve
            auth = ThreadAuthenticator(self._context, log=logging.getLogger(f"{__name__}.auth"))
            auth.start()
            auth.configure_curve_callback(domain="*", credentials_provider=AllowList(set(allowed)))
            log.info("upstream %s: CURVE, %d allowed sender key(s)", opts.endpoint, len(allowed))
        sock = self._context.socket(zmq.SUB)
        if self._curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_server = public, secret, True
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, opts.hwm)
            sock.setsockopt(zmq.MAXMSGSIZE, opts.max_message_bytes)
            sock.setsockopt(zmq.SUBSCRIBE, opts.topic)
            (sock.bind if opts.bind else sock.connect)(opts.endpoint)
            log.info("upstream: %s %s", "bound to" if opts.bind else "connected to", opts.endpoint)
            while not self._stopping.is_set():
                if not sock.poll(opts.poll_ms):
                    if ticks:
                        yield None, []
                    continue
                parts = sock.recv_multipart()
                self.received += 1
                try:
                    item = decode_message(parts, time.time(), opts.max_tracks, opts.max_pixels)
                    camera = item[0].camera
                    _need(camera in self.cameras or len(self.cameras) < opts.max_cameras,
                          f"camera {camera!r} would be camera {len(self.cameras) + 1} of this input, over "
                          f"max_cameras {opts.max_cameras}")
                    self.cameras.add(camera)
                except Exception as exc:  # Malformed, or anything else one message can raise: skip it, go on
                    if not isinstance(exc, Malformed):
                        exc = Malformed(f"{type(exc).__name__}: {str(exc)[:200]}")
                    self.malformed += 1
                    if self.malformed <= 10 or self.malformed % 100 == 0:  # a broken upstream must not flood the log
                        log.error("upstream %s: malformed message skipped (%d so far): %s",
                                  opts.endpoint, self.malformed, exc)
                    continue
                yield item
        finally:
            sock.close()
            if auth is not None:
                auth.stop()
                self._context.term()

    def stop(self) -> None:
        """End `frames()` within `poll_ms`; returns at once."""
        self._stopping.set()
