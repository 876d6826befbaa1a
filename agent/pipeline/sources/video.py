"""Frame sources: a reader thread decodes a file or a camera stream with PyAV into a bounded queue.

Live sources (rtsp, http, udp, ...) reconnect with capped exponential backoff and drop the oldest queued
frame when the consumer falls behind; files block the reader instead, so no frame is skipped, and end the
iteration at their end or at the first decode error. `Frame.index` counts decoded frames from 0 over the
life of the source, so frames dropped by the fps cap or the queue show as gaps in the indices. `realtime` plays
a file at its frame rate as a camera would (with `drop_when_full`, what the consumer cannot take is dropped).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urlencode, urlsplit

import av

from agent.types import Frame

log = logging.getLogger(__name__)

LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "rtp", "srt", "udp", "tcp", "http", "https"})


def is_live(url: str) -> bool:
    """True for network streams (rtsp, http, udp, ...), False for local files."""
    return urlsplit(url).scheme.lower() in LIVE_SCHEMES


# Query parameters that carry credentials in camera URLs (`?user=admin&pwd=...`, `?token=...`, signed URLs).
SECRET_PARAMS = re.compile(r"pass|pwd|token|secret|key|auth|sig|credential|session", re.IGNORECASE)


def redact(url: str) -> str:
    """The url with its password and the values of credential-like query parameters replaced by ***, for anything
    shown: logs, errors, health and metrics."""
    parts = urlsplit(url)
    if parts.password is not None:
        user, _, host = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{user.partition(':')[0]}:***@{host}")
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = [(k, "***" if SECRET_PARAMS.search(k) else v) for k, v in pairs]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return parts.geturl()


class SourceError(RuntimeError):
    """A source that opened but cannot be used: no video stream, corrupt or truncated data."""


def _describe(exc: Exception) -> str:
    if isinstance(exc, av.error.ExitError):  # PyAV's interrupt callback fired: open or read timeout
        return "timed out"
    if isinstance(exc, av.error.FFmpegError):
        return exc.strerror or str(exc)
    if isinstance(exc, SourceError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@dataclass
class SourceOptions:
    transport: str = "tcp"  # RTSP transport: "tcp" | "udp"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    reconnect: bool | None = None  # None: True for live urls, False for files
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    queue_size: int = 8  # frames
    drop_when_full: bool | None = None  # None: True for live urls (drop the oldest), False for files (block)
    max_fps: float | None = None  # keep at most this many frames per second of pts
    loop: bool = False  # replay the source from the start at its end (demos); pts keep increasing
    realtime: bool = False  # deliver a file's frames at their pts, as a camera would (demos, benchmarks)
    duration_s: float | None = None  # end after this many seconds of media (over the replays when looping)

    def __post_init__(self) -> None:
        if self.transport not in ("tcp", "udp"):
            raise ValueError(f"transport must be 'tcp' or 'udp', not {self.transport!r}")
        if self.queue_size < 1:
            raise ValueError("queue_size must be at least 1")


@dataclass
class SourceStats:
    decoded: int = 0
    dropped_queue: int = 0  # oldest frames dropped from a full queue
    dropped_fps: int = 0  # frames dropped by the max_fps cap
    dropped_late: int = 0  # realtime: frames decoded more than a queue's worth of frame periods after their time
    reconnects: int = 0
    errors: int = 0
    up: bool = False  # frames are coming in
    last_error: str | None = None
    last_frame_wall: float = 0.0  # time.time() of the last decoded frame
    gave_up: bool = False  # ended for good on last_error (a missing or unreadable file; live sources retry)


class VideoSource:
    """Decodes `url` on a daemon thread; iterate `frames()`, end with `stop()` (or use it as a context manager)."""

    def __init__(self, url: str, camera: str, options: SourceOptions | None = None) -> None:
        self.url, self.camera = url, camera
        self.options = opts = options or SourceOptions()
        live = is_live(url)
        self.reconnect = live if opts.reconnect is None else opts.reconnect
        self.drop_when_full = live if opts.drop_when_full is None else opts.drop_when_full
        self._stats = SourceStats()
        self._queue: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._done = False
        self._thread: threading.Thread | None = None
        self._last_pts: float | None = None
        self._next_due: float | None = None
        self._clock: tuple[float, float] | None = None  # realtime: (monotonic time, pts) of the first frame
        self._first_pts: float | None = None
        self._expired = False  # duration_s reached

    @property
    def stats(self) -> SourceStats:
        with self._cond:
            return replace(self._stats)

    def start(self) -> VideoSource:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"ingest-{self.camera}", daemon=True)
                self._thread.start()
        return self

    def frames(self) -> Iterator[Frame]:
        """Queued frames in order, until the source ends for good or `stop()` is called."""
        self.start()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._done or self._stopping)
                if self._stopping or not self._queue:
                    return
                frame = self._queue.popleft()
                self._cond.notify_all()
            yield frame

    def stop(self, timeout: float = 1.0) -> bool:
        """End `frames()` now and wait up to `timeout` s for the reader; True when it has exited.

        The reader checks between packets, so it exits at once unless blocked in a network read, which
        PyAV's timeouts end within connect_timeout_s / read_timeout_s (the thread is a daemon meanwhile).
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def __enter__(self) -> VideoSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        opts, where = self.options, f"camera {self.camera}: {redact(self.url)}"
        delay = opts.backoff_initial_s
        try:
            while not self._stopping:
                error, count = None, 0
                try:
                    count = self._decode()
                except Exception as exc:  # any failure ends this connection; the policy below decides what next
                    error = _describe(exc).replace(self.url, redact(self.url))  # FFmpeg quotes the url
                    with self._cond:
                        self._stats.errors += 1
                        self._stats.last_error = error
                if self._stopping:
                    return
                if self._expired:
                    log.info("%s: %.1f s of media played", where, opts.duration_s)
                    return
                if error is None and opts.loop and count:
                    log.debug("%s: replaying from the start", where)
                    continue
                if not self.reconnect:
                    if error:
                        with self._cond:
                            self._stats.gave_up = True
                        log.error("%s: %s; giving up", where, error)
                    else:
                        log.info("%s: ended after %d frames", where, self.stats.decoded)
                    return
                if count:
                    delay = opts.backoff_initial_s
                reason = error or "stream ended"
                with self._cond:  # down, and why, in one step: /healthz never shows a down camera without a cause
                    self._stats.up = False
                    self._stats.last_error = reason
                log.warning("%s: %s; retry in %.1f s", where, reason, delay)
                with self._cond:
                    if self._cond.wait_for(lambda: self._stopping, delay):
                        return
                    self._stats.reconnects += 1
                delay = min(delay * 2, opts.backoff_max_s)
        finally:
            with self._cond:
                self._done = True
                self._stats.up = False
                self._cond.notify_all()

    def _decode(self) -> int:
        """Decode one connection (one pass over a file) into the queue; the number of frames decoded."""
        opts = self.options
        av_options = {"rtsp_transport": opts.transport, "allowed_media_types": "video"}
        with av.open(
            self.url,
            options=av_options if urlsplit(self.url).scheme.lower().startswith("rtsp") else {},
            timeout=(opts.connect_timeout_s, opts.read_timeout_s),
        ) as container:
            if not container.streams.video:
                raise SourceError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            count, offset = 0, 0.0
            for packet in container.demux(stream):
                if self._stopping:
                    break
                corrupt = packet.is_corrupt and not self.reconnect  # in a file: flush what came before, then end
                try:
                    decoded = stream.decode(None if corrupt else packet)
                except av.error.InvalidDataError as exc:
                    if not self.reconnect:  # a file: corrupt or truncated data ends it
                        raise
                    with self._cond:  # a live stream: skip the damaged packet
                        self._stats.errors += 1
                        self._stats.last_error = _describe(exc)
                    continue
                for av_frame in decoded:
                    pts = av_frame.time if av_frame.time is not None else count / fps
                    if count == 0 and opts.loop and self._last_pts is not None:
                        offset = self._last_pts + 1.0 / fps - pts
                    if self._first_pts is None:
                        self._first_pts = pts
                    if opts.duration_s is not None and pts + offset - self._first_pts >= opts.duration_s:
                        self._expired = True
                        return count
                    count += 1
                    self._push(av_frame, pts + offset, fps)
                if corrupt:  # checked here as frame-threaded decoding does not raise on it
                    raise SourceError(f"corrupt or truncated data after {count} frames")
            return count

    def _push(self, av_frame: av.VideoFrame, pts: float, fps: float) -> None:
        with self._cond:
            stats = self._stats
            index = stats.decoded
            stats.decoded += 1
            stats.up = True
            stats.last_frame_wall = wall = time.time()
            self._last_pts = pts
            if self._capped(pts):
                stats.dropped_fps += 1
                return
        if self.options.realtime and not self._on_time(pts, fps):
            with self._cond:
                self._stats.dropped_late += 1
            return
        frame = Frame(self.camera, index, pts, av_frame.to_ndarray(format="bgr24"), wall)
        with self._cond:
            if len(self._queue) >= self.options.queue_size:
                if self.drop_when_full:
                    self._queue.popleft()
                    self._stats.dropped_queue += 1
                else:
                    self._cond.wait_for(lambda: len(self._queue) < self.options.queue_size or self._stopping)
            if not self._stopping:
                self._queue.append(frame)
                self._cond.notify_all()

    def _on_time(self, pts: float, fps: float) -> bool:
        """Realtime pacing: wait until `pts` is due on the wall clock; False for a frame decoded so late that a
        camera's stream would have overrun the queue (more than queue_size frame periods)."""
        if self._clock is None:
            self._clock = (time.monotonic(), pts)
        due = self._clock[0] + pts - self._clock[1]
        late = time.monotonic() - due
        if late < 0:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, -late)
        return late <= self.options.queue_size / fps

    def _capped(self, pts: float) -> bool:
        """True when the max_fps cap drops a frame at `pts`; kept frames follow a steady cadence of 1/max_fps."""
        if not self.options.max_fps:
            return False
        period, due = 1.0 / self.options.max_fps, self._next_due
        if due is not None and due - 2 * period <= pts < due - 0.05 * period:
            return True
        restart = due is None or abs(pts - due) > period  # first frame, a gap, or pts jumped back (reconnect)
        self._next_due = (pts if restart else due) + period
        return False


def open_source(url: str, camera: str, options: SourceOptions | None = None) -> VideoSource:
    """A started VideoSource for `url` (a file path or a stream url)."""
    return VideoSource(url, camera, options).start()
