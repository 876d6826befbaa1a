"""A stand-in for an upstream tracker (DeepStream, Savant): sends a video's frames with face tracks over ZeroMQ in
agent/pipeline/sources/upstream.py's wire format.

    .venv/bin/python tests/upstream_sender.py --video clip.mp4 --endpoint tcp://127.0.0.1:5600 [--boxes tracks.json]

tracks.json maps frame numbers (as strings, from 0) to that frame's "tracks" list in the wire format; frames it does
not name are sent with no tracks. The sender binds an XPUB socket (or connects with --connect) and waits for a
subscriber before the first frame, so nothing is lost to ZeroMQ's late-joiner drop.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import zmq

from agent.types import Frame

log = logging.getLogger("upstream_sender")
Tracks = Callable[[Frame], list[dict]]  # a frame's tracks, as the wire format's "tracks" list


def video_frames(path: Path | str, camera: str, limit: int | None = None) -> Iterator[Frame]:
    """The video's frames (BGR) with their pts, decoded by PyAV."""
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == limit:
                return
            yield Frame(camera, index, float(frame.time), frame.to_ndarray(format="bgr24"), time.time())


def message(frame: Frame, tracks: list[dict], encoding: str = "jpeg", topic: bytes | None = None) -> list[bytes]:
    """The multipart message for one frame: [topic,] JSON header, JPEG or raw BGR image."""
    header = {"camera": frame.camera, "frame_id": frame.index, "pts": frame.pts, "tracks": tracks,
              "encoding": encoding}
    if encoding == "jpeg":
        image = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    else:
        header["shape"] = list(frame.image.shape)
        image = np.ascontiguousarray(frame.image).tobytes()
    return ([topic] if topic is not None else []) + [json.dumps(header).encode(), image]


def send(endpoint: str, frames: Iterable[Frame], tracks: Tracks, *, encoding: str = "jpeg",
         topic: bytes | None = None, bind: bool = True, subscribers: int = 1, wait_s: float = 10.0,
         realtime: bool = False, context: zmq.Context | None = None) -> int:
    """Send every frame with its tracks once `subscribers` subscribers are there; the number sent.

    realtime paces the frames by their pts; otherwise they go as fast as they are made.
    """
    sock = (context or zmq.Context.instance()).socket(zmq.XPUB)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # one subscription message per subscriber, even for the same topic
    sock.setsockopt(zmq.SNDHWM, 1000)
    try:
        (sock.bind if bind else sock.connect)(endpoint)
        deadline = time.monotonic() + wait_s
        for _ in range(subscribers):
            if not sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise TimeoutError(f"no subscriber on {endpoint} within {wait_s} s")
            sock.recv()  # b"\x01" + topic
        sent, start, first_pts = 0, time.monotonic(), None
        for frame in frames:
            if realtime:
                first_pts = frame.pts if first_pts is None else first_pts
                time.sleep(max(0.0, start + frame.pts - first_pts - time.monotonic()))
            sock.send_multipart(message(frame, tracks(frame), encoding, topic))
            sent += 1
        log.info("sent %d frames to %s", sent, endpoint)
        return sent
    finally:
        sock.close(linger=5000)  # let queued frames go out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", type=Path, required=True)
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:5600")
    ap.add_argument("--connect", action="store_true", help="connect to a bound subscriber instead of binding")
    ap.add_argument("--camera", default="cam0")
    ap.add_argument("--encoding", choices=("jpeg", "raw"), default="jpeg")
    ap.add_argument("--topic", help="send a leading topic frame")
    ap.add_argument("--boxes", type=Path, help="JSON: frame number -> list of tracks")
    ap.add_argument("--limit", type=int, help="send at most this many frames")
    ap.add_argument("--subscribers", type=int, default=1, help="wait for this many subscribers (0: do not wait)")
    ap.add_argument("--realtime", action="store_true", help="pace the frames by their pts")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    boxes = json.loads(args.boxes.read_text()) if args.boxes else {}
    send(args.endpoint, video_frames(args.video, args.camera, args.limit), lambda f: boxes.get(str(f.index), []),
         encoding=args.encoding, topic=args.topic.encode() if args.topic else None, bind=not args.connect,
         subscribers=args.subscribers, realtime=args.realtime)


if __name__ == "__main__":
    main()
