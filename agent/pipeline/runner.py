"""The pipeline: source -> detector -> tracker -> aligner -> gate | scorer -> selector -> publisher.

One worker thread per camera (decode, detect, track, align, cheap gates) feeds one bounded queue; one
scoring thread drains it, scores the candidates of all cameras in shared batches, keeps the best shot per
track and publishes ended tracks. A full queue blocks the workers (a live source then drops its oldest
frames, counted), so nothing that was accepted is lost; at the end of a stream or on stop() every open
track is flushed.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from agent.backends.base import default_threads
from agent.common.fr_spec import FRSpec
from agent.pipeline.align import align, context_crop
from agent.pipeline.cadence import Cadence
from agent.pipeline.detect import DetectorSpec, make_detector
from agent.pipeline.score import Scorer
from agent.pipeline.select import Candidate, Gate, SelectionConfig, Selector, TokenBucket
from agent.pipeline.sources.upstream import UpstreamOptions, UpstreamSource
from agent.pipeline.sources.video import SourceOptions, VideoSource, is_live
from agent.pipeline.track import Tracker, TrackerConfig
from agent.types import BestShot, Frame, TrackedFace

log = logging.getLogger(__name__)


@dataclass
class CameraConfig:
    id: str
    url: str | None = None  # a video source (file, rtsp://, http://) ...
    upstream: UpstreamOptions | None = None  # ... or frames with tracks from an upstream pipeline
    source: SourceOptions = field(default_factory=SourceOptions)
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    detect_every: int = 1  # run the detector on every Nth frame (the tracker bridges the gaps)
    context_margin: float = 0.5


class StageTimes:
    """Accumulated milliseconds per stage (each stage written by one thread)."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.observers: list[Callable[[str, float], None]] = []

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        self.ms[stage] += seconds * 1000.0
        self.n[stage] += count
        for obs in self.observers:
            obs(stage, seconds)


@dataclass
class _Eos:
    camera: str
    worker: CameraWorker


class _Ends:
    """Track ends for upstream tracks (no tracker of ours): a track unseen for `max_lost_s` of stream time, or of
    wall-clock time (a stream whose pts stand still, a camera that fell silent), has ended."""

    def __init__(self, max_lost_s: float, max_open: int = 64):  # TrackerConfig.max_open_tracks
        self.max_lost_s, self.max_open = max_lost_s, max_open
        self.last: dict[int, tuple[float, float]] = {}  # track -> (pts, wall time) last seen, oldest first

    def update(self, tracks: list[TrackedFace], pts: float, wall: float) -> list[int]:
        for t in tracks:
            self.last.pop(t.track_id, None)  # re-inserted: the dict stays ordered by last sighting
            self.last[t.track_id] = (pts, wall)
        ended = self.expire(pts, wall)
        while len(self.last) > self.max_open:  # each open track holds crops: the least recently seen ends
            tid = next(iter(self.last))
            del self.last[tid]
            ended.append(tid)
        return ended

    def expire(self, pts: float | None, wall: float) -> list[int]:
        """The tracks unseen for too long at (`pts` of this camera, or None for another camera's message)."""
        ended = [tid for tid, (p, w) in self.last.items()
                 if (pts is not None and pts - p > self.max_lost_s) or wall - w > self.max_lost_s]
        for tid in ended:
            del self.last[tid]
        return ended

    def finish(self) -> list[int]:
        ended, self.last = list(self.last), {}
        return ended


def _is_live(cam: CameraConfig) -> bool:
    """An input that should never end: an upstream subscription, or a live url (files end; that is normal)."""
    if cam.upstream is not None:
        return True
    reconnect = cam.source.reconnect
    return bool(reconnect if reconnect is not None else cam.url and is_live(cam.url))


class CameraWorker(threading.Thread):
    """Decodes one camera (or one upstream input, which may carry several cameras) and gates its faces."""

    def __init__(self, cam: CameraConfig, fr: FRSpec, out: queue.Queue, budget: TokenBucket, times: StageTimes,
                 track_ids: Iterator[int] | None = None):
        super().__init__(name=f"camera-{cam.id}", daemon=True)
        self.cam, self.fr, self.out, self.budget, self.times = cam, fr, out, budget, times
        self.track_ids = track_ids
        self.stopping = threading.Event()
        self.gates: dict[str, Gate] = {}
        self.frames = 0
        self.detections = 0
        self.skipped_faces = 0  # faces whose crop failed (logged), the frame's other faces go on
        self.error: str | None = None
        if cam.upstream is not None:
            self.source: VideoSource | UpstreamSource = UpstreamSource(cam.upstream)
            self.detector = None
        else:
            if not cam.url:
                raise ValueError(f"camera {cam.id}: needs a url or an upstream input")
            self.source = VideoSource(cam.url, cam.id, cam.source)
            self.detector = make_detector(cam.detector)
        self.cadence = Cadence(cam.detect_every, cam.detector.idle_every_s, cam.detector.motion_area)

    def stop(self) -> None:
        self.stopping.set()
        self.source.stop()

    @property
    def failure(self) -> str | None:
        """Why this input ended for good: its source gave up (a missing or unreadable file), or the worker failed and
        is not restarted (not a live input). None while it runs, when it ended normally or was stopped."""
        if self.error and not _is_live(self.cam):
            return self.error
        stats = getattr(self.source, "stats", None)  # a VideoSource's; an upstream input never gives up
        return stats.last_error if stats is not None and stats.gave_up else None

    def _gate(self, camera: str) -> Gate:
        g = self.gates.get(camera)
        if g is None:
            g = self.gates[camera] = Gate(camera, self.cam.selection, self.budget)
        return g

    def _end(self, camera: str, track_ids: list[int], flush: bool = False) -> None:
        """flush: the tracks end because the stream did (or the agent stops), not because the tracker lost them."""
        gate = self._gate(camera)
        for tid in track_ids:
            pending, end = gate.end(tid)
            if pending is not None:
                self.out.put(pending)
            if end is not None:
                self.out.put((end, time.time(), flush))

    def _items(self) -> Iterator[tuple[Frame | None, list[TrackedFace] | None]]:
        if isinstance(self.source, UpstreamSource):
            yield from self.source.frames(ticks=True)
        else:
            for f in self.source.frames():
                yield f, None

    def run(self) -> None:
        trackers: dict[str, Tracker | _Ends] = {}
        try:
            t0 = time.perf_counter()
            for frame, upstream_tracks in self._items():
                if self.stopping.is_set():
                    break
                if frame is None:  # an upstream input with nothing to say: its silent tracks still end on time
                    for camera, tr in trackers.items():
                        self._end(camera, tr.expire(None, time.monotonic()))
                    continue
                # counted with the frame it took (so decode counts equal frames, also when stopped mid-way)
                self.times.add("decode", time.perf_counter() - t0)
                self._frame(frame, upstream_tracks, trackers)
                t0 = time.perf_counter()
        except Exception as e:  # a camera failing never stops the others
            self.error = f"{type(e).__name__}: {e}"
            log.exception("camera %s: worker failed", self.cam.id)
        finally:
            for camera, tr in trackers.items():
                self._end(camera, tr.finish(), flush=True)
            self.out.put(_Eos(self.cam.id, self))

    def _cap_open(self, trackers: dict[str, _Ends], camera: str, ended: list[int]) -> None:
        """At most `max_open_tracks_input` open over the input's cameras: the least recently seen ones end (their
        best shots go out as at any end). Ends of `camera` join `ended`; the others' are sent here."""
        cap = self.cam.tracker.max_open_tracks_input
        open_tracks = sorted((w, cam, tid) for cam, tr in trackers.items() for tid, (_, w) in tr.last.items())
        for _, cam, tid in open_tracks[: max(0, len(open_tracks) - cap)]:
            del trackers[cam].last[tid]
            if cam == camera:
                ended.append(tid)
            else:
                self._end(cam, [tid])

    def _frame(self, frame: Frame, upstream_tracks: list[TrackedFace] | None, trackers: dict) -> None:
        self.frames += 1
        if upstream_tracks is None:
            open_tracks = trackers.get(frame.camera)
            if not self.cadence.due(frame.pts, frame.image, bool(open_tracks and open_tracks.tracks)):
                return
            t = time.perf_counter()
            dets = self.detector.detect(frame.image)
            self.times.add("detect", time.perf_counter() - t)
            self.detections += len(dets)
            t = time.perf_counter()
            tracker = trackers.get(frame.camera) or trackers.setdefault(
                frame.camera, Tracker(self.cam.tracker, self.track_ids))
            update = tracker.update(dets, frame.pts)
            faces, ended = update.active, update.ended
            self.times.add("track", time.perf_counter() - t)
        else:
            wall = time.monotonic()
            tracker = trackers.setdefault(frame.camera, _Ends(self.cam.tracker.max_lost_s,
                                                               self.cam.tracker.max_open_tracks))
            faces, ended = upstream_tracks, tracker.update(upstream_tracks, frame.pts, wall)
            self.detections += len(faces)
            for camera, other in trackers.items():  # the input's other cameras: their silent tracks end too
                if other is not tracker:
                    self._end(camera, other.expire(None, wall))
            self._cap_open(trackers, frame.camera, ended)
        t = time.perf_counter()
        gate = self._gate(frame.camera)

        def crops(det):
            return align(frame.image, det, self.fr), context_crop(frame.image, det.bbox, self.cam.context_margin)

        for face in faces:
            try:
                cand = gate.observe(frame.index, frame.pts, face.track_id, face.det, crops)
            except Exception as e:  # one face that cannot be cropped (degenerate landmarks, ...) is skipped alone
                self.skipped_faces += 1
                if self.skipped_faces <= 10 or self.skipped_faces % 100 == 0:
                    log.error("camera %s frame %d track %d: face skipped (%d so far): %s: %s", frame.camera,
                              frame.index, face.track_id, self.skipped_faces, type(e).__name__, e)
                continue
            if cand is not None:
                self.out.put(cand)
        self.times.add("align", time.perf_counter() - t)
        self._end(frame.camera, ended)


class Pipeline:
    """Runs the cameras' workers and the scoring loop; `publish(shot)` receives every shot."""

    def __init__(self, cameras: list[CameraConfig], fr: FRSpec, scorer: Scorer, publish: Callable[[BestShot], bool],
                 score_budget: float | None = None, queue_size: int = 64, trace: Path | None = None,
                 enrich: Callable | None = None, tick: Callable[[], object] | None = None):
        """tick: called on the scoring thread between batches (e.g. the publisher's spool pump)."""
        self.fr, self.scorer, self.publish, self.enrich, self.tick = fr, scorer, publish, enrich, tick
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.budget = TokenBucket(score_budget, burst=max(4.0, (score_budget or 0) / 2))
        self.times = StageTimes()
        self._trace_file: IO[str] | None = open(trace, "w", buffering=1) if trace else None  # noqa: SIM115 (line by line: it can be followed live)
        self.selectors: dict[str, Selector] = {}
        self.workers: dict[str, CameraWorker] = {}
        self.finished: list[CameraWorker] = []  # workers whose stream ended (for their counters)
        self.retiring: list[CameraWorker] = []  # replaced workers still flushing (configuration reload)
        self.ended: dict[str, str | None] = {}  # camera -> why its input ended for good, None when it ended normally
        self.track_ids: dict[str, Iterator[int]] = {}  # per camera, shared by its successive trackers
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.published = 0
        self.scored = 0
        self.heartbeat = time.monotonic()  # the scoring loop's latest turn (liveness: agent.service.metrics.Liveness)
        # track end -> message, for tracks the tracker ended (unseen for max_lost_s) and for those a stream's end or a
        # stop flushed (all of a camera's open tracks at once)
        self.end_latency_s: list[float] = []
        self.flush_latency_s: list[float] = []
        # Live inputs whose worker failed: restarted after a backoff (1 s doubling to 60 s), never left dead.
        self.restarts: dict[str, int] = {}
        self.pending: dict[str, tuple[float, CameraConfig, str]] = {}  # camera -> (when, config, the error)
        self._backoff: dict[str, float] = {}
        # Each camera's detector gets its share of the cores unless set: 2 cameras on 2 cores with 2 threads each
        # held 2 cameras at 10 fps, with 1 thread each 3 (docs/PERFORMANCE.md, bench cameras).
        self.detector_threads = max(1, default_threads() // max(1, sum(c.upstream is None for c in cameras)))
        for cam in cameras:
            self.add_camera(cam)

    def _trace(self, rec: dict) -> None:
        if self._trace_file is not None:
            self._trace_file.write(json.dumps(rec) + "\n")

    def add_camera(self, cam: CameraConfig) -> None:
        """Add (or replace) a camera; call start_workers() to start it once the pipeline runs."""
        if cam.detector.threads is None:
            cam = replace(cam, detector=replace(cam.detector, threads=self.detector_threads))
        worker = CameraWorker(cam, self.fr, self.queue, self.budget, self.times,
                              self.track_ids.setdefault(cam.id, itertools.count(1)))
        with self.lock:
            old = self.workers.get(cam.id)
            if old is not None:
                old.stop()
                self.retiring.append(old)
            sel = self.selectors.get(cam.id)
            if sel is None:
                self.selectors[cam.id] = Selector(cam.selection, self.scorer.model_id, self._trace, self.enrich)
            else:
                sel.config = cam.selection  # open tracks keep their state; new settings apply from now
            self.workers[cam.id] = worker

    def remove_camera(self, camera_id: str) -> None:
        """Stop one camera; its open tracks are flushed through the scoring loop like any other end."""
        with self.lock:
            worker = self.workers.get(camera_id)
        if worker is not None:
            worker.stop()

    def start_workers(self) -> None:
        with self.lock:
            for w in self.workers.values():
                if w.ident is None:
                    w.start()

    def _alive(self) -> bool:
        with self.lock:
            return bool(self.pending) or any(w.is_alive() for w in [*self.workers.values(), *self.retiring])

    def _restart_due(self) -> None:
        now = time.monotonic()
        with self.lock:
            due = [(cam_id, cam) for cam_id, (when, cam, _) in self.pending.items() if now >= when]
            for cam_id, _ in due:
                del self.pending[cam_id]
        for cam_id, cam in due:
            if not self.stopping.is_set():
                log.info("camera %s: restarting its worker (restart %d)", cam_id, self.restarts[cam_id])
                self.add_camera(cam)
        self.start_workers()

    def _schedule_restart(self, worker: CameraWorker) -> None:
        """A live input's worker died of an error: start a new one after the camera's backoff."""
        cam = worker.cam
        delay = self._backoff.get(cam.id, 1.0)
        self._backoff[cam.id] = min(2 * delay, 60.0)
        with self.lock:  # /healthz reads these from its own thread
            self.restarts[cam.id] = self.restarts.get(cam.id, 0) + 1
            self.pending[cam.id] = (time.monotonic() + delay, cam, worker.error or "")
        log.error("camera %s: worker failed (%s); restart %d in %.0f s", cam.id, worker.error, self.restarts[cam.id],
                  delay)

    def stop(self) -> None:
        """Stop the sources; run() then flushes every open track and returns."""
        self.stopping.set()
        with self.lock:
            self.pending.clear()
            workers = [*self.workers.values(), *self.retiring]
        for w in workers:
            w.stop()

    def run(self) -> None:
        """Process until every source has ended (files) or stop() was called, then flush."""
        self.start_workers()
        try:
            while True:
                self.heartbeat = time.monotonic()
                items = self._drain()
                self.heartbeat = time.monotonic()
                if self.tick is not None:
                    self.tick()
                if self.pending:
                    self._restart_due()
                if items:
                    self._process(items)
                elif not self._alive() and self.queue.empty():
                    break
        finally:
            if self._trace_file is not None:
                self._trace_file.close()

    def _drain(self) -> list:
        try:
            items = [self.queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        n = 1 if isinstance(items[0], Candidate) else 0
        while n < self.scorer.max_batch:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            items.append(item)
            n += isinstance(item, Candidate)
        return items

    def _selector(self, camera: str) -> Selector:
        """The selector of a camera (upstream inputs may name cameras that are not configured)."""
        sel = self.selectors.get(camera)
        if sel is None:
            any_sel = next(iter(self.selectors.values()))
            sel = self.selectors[camera] = Selector(any_sel.config, self.scorer.model_id, self._trace, self.enrich)
        return sel

    def _process(self, items: list) -> None:
        cands = [i for i in items if isinstance(i, Candidate)]
        if cands:
            t = time.perf_counter()
            scored = self.scorer.score([c.crop for c in cands], [c.det.score for c in cands],
                                       [c.det.size for c in cands])
            for c, s in zip(cands, scored, strict=True):
                c.scored = s
            self.times.add("score", time.perf_counter() - t, len(cands))
            self.scored += len(cands)
        for item in items:
            shot, end_wall, flush = None, None, False
            if isinstance(item, Candidate):
                shot = self._selector(item.camera).add(item)
            elif isinstance(item, tuple):
                end, end_wall, flush = item
                shot = self._selector(end.camera).end(end)
            elif isinstance(item, _Eos):
                worker = item.worker
                with self.lock:
                    current = self.workers.get(item.camera) is worker
                    if current:
                        del self.workers[item.camera]
                    elif worker in self.retiring:
                        self.retiring.remove(worker)
                    self.finished.append(worker)
                    if current:  # a replaced worker's end says nothing of the camera
                        self.ended[item.camera] = worker.failure
                if current and worker.error and _is_live(worker.cam) and not self.stopping.is_set():
                    self._schedule_restart(worker)
                worker.detector = None  # only its counters are needed from now on
                log.info("camera %s: ended after %d frames, %d faces detected%s", item.camera, worker.frames,
                         worker.detections, f" ({worker.error})" if worker.error else "")
            if shot is not None:
                t = time.perf_counter()
                if self.publish(shot):
                    self.published += 1
                self.times.add("publish", time.perf_counter() - t)
                if end_wall is not None:
                    (self.flush_latency_s if flush else self.end_latency_s).append(time.time() - end_wall)
