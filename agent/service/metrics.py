"""Prometheus metrics and health: /metrics and /healthz on one small HTTP server.

Counters are read from the pipeline, its camera workers and sources and the publisher at scrape time (one
bookkeeping, in the stages); per-stage latencies are observed through `StageTimes.observers` into histograms.
Everything lives on the Metrics' own CollectorRegistry (with the process collector: memory, CPU, open files), with
`bestshot_build_info{version, model_id} 1`: which build and which scoring model produced the shots.

`Liveness` decides whether the agent is alive, for the systemd watchdog and /healthz: the scoring loop turned
recently and no camera worker is stuck (its source delivers frames that the worker does not take).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent import __version__

log = logging.getLogger(__name__)

STAGES = ("decode", "detect", "track", "align", "score", "publish")
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
HealthFn = Callable[[], tuple[bool, dict[str, Any]]]


def _workers(pipeline: Any) -> tuple[list[Any], dict[str, Any]]:
    """(every camera worker ever: ended, retiring and running, so that counters never go back; the running ones)."""
    with pipeline.lock:
        running = dict(pipeline.workers)
        return [*pipeline.finished, *pipeline.retiring, *running.values()], running


def source_counts(worker: Any) -> dict[str, Any]:
    """A worker's source as numbers: decoded, dropped by reason, reconnects, up (upstream: up while subscribed)."""
    src = worker.source
    if hasattr(src, "stats"):  # VideoSource
        s = src.stats
        return {"decoded": s.decoded, "dropped": {"queue": s.dropped_queue, "fps": s.dropped_fps},
                "reconnects": s.reconnects, "up": s.up and worker.is_alive(), "last_error": s.last_error}
    return {"decoded": src.received - src.malformed, "dropped": {"malformed": src.malformed}, "reconnects": 0,
            "up": worker.is_alive(), "last_error": None}


class Metrics:
    """`Metrics().bind(pipeline, publisher)`; expose `registry` with serve()."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.pipeline: Any = None
        self.publisher: Any = None
        self.stage_seconds = Histogram("bestshot_stage_seconds", "Latency of one pipeline stage step (score: a batch)",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        self.build = Info("bestshot_build", "The agent's version and the scoring model's id", registry=self.registry)
        ProcessCollector(registry=self.registry)
        self.registry.register(self)

    def bind(self, pipeline: Any, publisher: Any) -> Metrics:
        """Read counters from these from now on (call again after replacing either)."""
        if pipeline is not self.pipeline:
            pipeline.times.observers.append(self.observe)
        self.pipeline, self.publisher = pipeline, publisher
        self.build.info({"version": __version__, "model_id": pipeline.scorer.model_id})
        return self

    def observe(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def collect(self) -> Iterator[Metric]:
        """Per camera, the sum over all its workers (a reload replaces a camera's worker; its counts stay)."""
        pipeline, publisher = self.pipeline, self.publisher
        if pipeline is None:
            return
        sums: dict[tuple[str, ...], Counter] = defaultdict(Counter)  # (name, label values...) -> value
        everyone, running = _workers(pipeline)
        for w in everyone:
            cam, src = w.cam.id, source_counts(w)
            sums["frames_decoded"][cam,] += src["decoded"]
            for reason, n in src["dropped"].items():
                sums["frames_dropped"][cam, reason] += n
            sums["detections"][cam,] += w.detections
            sums["camera_reconnects"][cam,] += src["reconnects"]
            for gate in list(w.gates.values()):
                for name, n in (("tracks_opened", gate.opened), ("tracks_closed", gate.closed),
                                ("faces_gated", gate.gated), ("faces_deferred", gate.deferred)):
                    sums[name][gate.camera,] += n
        for name, labels, doc in COUNTERS:
            family = CounterMetricFamily(f"bestshot_{name}", doc, labels=list(labels))
            for values, n in sorted(sums[name].items()):
                family.add_metric(list(values), n)
            yield family
        up = GaugeMetricFamily("bestshot_camera_up", "1 while frames are coming in from the camera", labels=["camera"])
        for cam, w in sorted(running.items()):
            up.add_metric([cam], float(source_counts(w)["up"]))
        yield up
        yield CounterMetricFamily("bestshot_candidates_scored", "Faces scored (all cameras)", value=pipeline.scored)
        yield GaugeMetricFamily("bestshot_scoring_queue", "Items waiting for the scoring loop",
                                value=pipeline.queue.qsize())
        if publisher is not None:
            yield CounterMetricFamily("bestshot_shots_published", "Best shots sent, each once however many outputs "
                                      "took it (per output: bestshot_output_published)", value=pipeline.published)
            yield CounterMetricFamily("bestshot_shots_dropped", "Best shots that could not be sent",
                                      value=publisher.dropped)
            yield from output_families(getattr(publisher, "outputs", ()))


OUTPUT_COUNTS = (  # agent/pipeline/outputs/base.py: Counts
    ("published", "Shots handed to the output's transport (first attempt)"),
    ("acked", "Shots the output's server confirmed (NATS ack, MQTT PUBACK)"),
    ("retried", "Further attempts to deliver a shot"),
    ("spooled", "Shots written to the output's on-disk spool"),
    ("dropped", "Shots lost by the output (queue full, refused, spool write failed)"),
)


def output_families(outputs: Any) -> Iterator[Metric]:
    """bestshot_output_<count>_total{output} for each output, and bestshot_output_up{output}."""
    counts = [(o.name, o.counts.as_dict()) for o in outputs]
    for name, doc in OUTPUT_COUNTS:
        family = CounterMetricFamily(f"bestshot_output_{name}", doc, labels=["output"])
        for output, c in counts:
            family.add_metric([output], c[name])
        yield family
    up = GaugeMetricFamily("bestshot_output_up", "1 while the output delivers normally", labels=["output"])
    for o in outputs:
        up.add_metric([o.name], float(o.health()[0]))
    yield up


COUNTERS = (  # name, labels, help; per camera (an upstream input's tracks: per camera it names)
    ("frames_decoded", ("camera",), "Frames decoded (upstream: well-formed messages)"),
    ("frames_dropped", ("camera", "reason"), "Frames dropped before detection"),
    ("detections", ("camera",), "Faces detected (upstream: tracked faces received)"),
    ("camera_reconnects", ("camera",), "Reconnections to the camera"),
    ("tracks_opened", ("camera",), "Face tracks started"),
    ("tracks_closed", ("camera",), "Face tracks ended"),
    ("faces_gated", ("camera",), "Faces dropped by the cheap gates (size, score, blur)"),
    ("faces_deferred", ("camera",), "Faces not scored at once for lack of budget"),
)


class Liveness:
    """Whether the agent's loops make progress: `problems()` (watchdog) and `health()` (/healthz).

    Stuck: the scoring loop has not turned for `stall_s` (Pipeline.heartbeat), or a camera worker has taken no
    frame for `stall_s` while its source is up. A camera that is down is not stuck (its source reconnects); /healthz
    reports it, and is unhealthy when no camera at all is up.
    """

    def __init__(self, pipeline: Any, stall_s: float = 20.0, clock: Callable[[], float] = time.monotonic,
                 outputs: Any = None):
        """clock: the time the heartbeat is read against (the pipeline's, time.monotonic); outputs: the fan-out
        (agent/pipeline/outputs/base.py), whose outputs' health /healthz shows (one not delivering is a reason)."""
        self.pipeline, self.stall_s, self.clock, self.outputs = pipeline, stall_s, clock, outputs
        self._progress: dict[int, tuple[int, float]] = {}  # id(worker) -> (frames, monotonic time they changed)
        self._lock = threading.Lock()

    def problems(self) -> list[str]:
        now = self.clock()
        out = []
        idle = now - self.pipeline.heartbeat
        if idle > self.stall_s:
            out.append(f"scoring loop stalled for {idle:.0f} s")
        _, running = _workers(self.pipeline)
        with self._lock:
            progress, self._progress = self._progress, {}
            for cam, w in running.items():
                frames, since = progress.get(id(w), (-1, now))
                if w.frames != frames:
                    since = now
                self._progress[id(w)] = (w.frames, since)
                if w.is_alive() and hasattr(w.source, "stats") and w.source.stats.up and now - since > self.stall_s:
                    out.append(f"camera {cam}: worker took no frame for {now - since:.0f} s while its source is up")
        return out

    def health(self) -> tuple[bool, dict[str, Any]]:
        reasons = self.problems()
        everyone, running = _workers(self.pipeline)
        cameras = {w.cam.id: {"up": False, "ended": True, "frames": w.frames, "reconnects": src["reconnects"],
                              "last_error": src["last_error"] or w.error}
                   for w in everyone if w.cam.id not in running for src in [source_counts(w)]}
        for cam, w in running.items():
            src = source_counts(w)
            cameras[cam] = {"up": bool(src["up"]), "ended": False, "frames": w.frames, "reconnects": src["reconnects"],
                            "last_error": src["last_error"] or w.error}
        now = self.clock()
        with self.pipeline.lock:
            pending = dict(getattr(self.pipeline, "pending", {}))
        for cam, (when, _, error) in pending.items():
            cameras[cam] = {**cameras.get(cam, {}), "up": False, "ended": False, "last_error": error,
                            "restarts": self.pipeline.restarts.get(cam, 0),
                            "restart_in_s": round(max(0.0, when - now), 1)}
            reasons.append(f"camera {cam}: worker failed ({error}); restarting")
        if running and not any(c["up"] for c in cameras.values()):
            reasons.append("no camera is up")
        body: dict[str, Any] = {"cameras": cameras}
        if self.outputs is not None:
            body["outputs"] = self.outputs.health()
            reasons += [f"output {name}: {h.get('reason', 'not delivering')}" for name, h in body["outputs"].items()
                        if not h["ok"]]
        return not reasons, {"status": "unhealthy" if reasons else "ok", "reasons": reasons, **body}


class _BoundedServer(ThreadingHTTPServer):
    """At most `max_connections` connections served at once; one more is closed at once (a client retries), so
    idle or slow clients cannot use up the process's threads and file descriptors."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Pages(Protocol):
    def handle(self, handler: BaseHTTPRequestHandler, path: str) -> bool:
        """Answer `path` (True) or leave it (False: 404)."""


def serve(listen: str, registry: CollectorRegistry | None, health: HealthFn | None, max_connections: int = 32,
          request_timeout_s: float = 5.0, pages: Pages | None = None) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz (each unless None) and `pages` (the live page) on HOST:PORT (empty host: all
    interfaces) from a daemon thread; end with `.shutdown()` then `.server_close()`. OSError when the address cannot
    be bound. A connection that sends no complete request within `request_timeout_s` is closed, as is one whose
    answer is not read within it; at most `max_connections` are served at once."""
    host, _, port = listen.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        timeout = request_timeout_s  # socket timeout for reading the request (and writing the answer)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics" and registry is not None:
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz" and health is not None:
                ok, body = health()
                self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
            elif pages is None or not pages.handle(self, path):
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), fmt % args)

    server = _BoundedServer((host or "0.0.0.0", int(port)), Handler, max_connections)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    routes = [r for r, on in (("/metrics", registry), ("/healthz", health), ("/ (live page)", pages)) if on is not None]
    log.info("http://%s:%d: %s", *server.server_address[:2], ", ".join(routes))
    return server
