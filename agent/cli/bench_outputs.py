"""`bestshot bench outputs`: shots/s each output sustains and its publish-to-ack latency, against real servers.

Shots are cut from scikit-image's astronaut photo (a 112x112 face crop, a 320x240 context crop, a 512-d embedding),
so JPEG encoding is part of the cost as it is in the agent. Each output is fed as fast as it acknowledges, with at
most `window` shots outstanding; ZeroMQ (PUSH to a PULL consumer in this process) has no acks: its figure is
shots/s received. NATS and MQTT run only when given a server (`--nats URL`, `--mqtt HOST:PORT`).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import cv2
import numpy as np
import zmq

from agent.pipeline.outputs.base import new_shot_id
from agent.pipeline.outputs.mqtt import MqttConfig, MqttOutput
from agent.pipeline.outputs.nats import NatsConfig, NatsOutput, StreamSettings
from agent.pipeline.outputs.zeromq import Publisher, PublisherConfig
from agent.types import BestShot


@dataclass
class OutputBench:
    output: str
    shots: int
    seconds: float
    ack_ms_p50: float | None
    ack_ms_p95: float | None

    @property
    def shots_per_s(self) -> float:
        return self.shots / self.seconds


def bench_shots(n: int = 32) -> list[BestShot]:
    from skimage import data

    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # 512x512
    rng = np.random.default_rng(0)
    shots = []
    for i in range(n):
        d = i % 16
        emb = rng.standard_normal(512).astype(np.float32)
        shots.append(BestShot(
            camera="bench", track_id=i, status="best", first_seen=0.0, best_time=0.5, last_seen=1.0, frame_index=i,
            bbox=np.array([170, 40, 320, 240], np.float32), landmarks=None, det_score=0.9, quality=0.8, drift=0.4,
            prefiqs=0.8, frames_seen=30, frames_scored=10, model_id="bench",
            crop=cv2.resize(photo[30 + d:250 + d, 160 + d:330 + d], (112, 112)),
            context=cv2.resize(photo[d:400 + d, 60 + d:480 + d], (320, 240)),
            embedding=emb / np.linalg.norm(emb), extra={}))
    return shots


def _feed(output: Any, shots: list[BestShot], count: int, window: int, done: Callable[[], int],
          timeout_s: float) -> float:
    """Submit `count` shots keeping at most `window` not yet done; seconds until the last is done."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    sent = 0
    while done() < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{output.name}: {done()} of {count} shots done in {timeout_s:.0f} s")
        if sent < count and sent - done() < window:
            if output.submit(shots[sent % len(shots)], new_shot_id()):
                sent += 1
            continue
        time.sleep(0.0005)
    return time.monotonic() - t0


def _percentiles(lat: list[float]) -> tuple[float | None, float | None]:
    if not lat:
        return None, None
    q = statistics.quantiles([x * 1000 for x in lat], n=20)
    return statistics.median(lat) * 1000, q[18]


def _bench_zeromq(shots: list[BestShot], count: int, window: int) -> OutputBench:
    pub = Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", mode="push", name="zeromq", sndhwm=window))
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.connect(pub.endpoint)
    received = [0]

    def consume() -> None:
        while received[0] < count and pull.poll(10_000):
            pull.recv_multipart()
            received[0] += 1

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        while not pub._sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT:  # the consumer connected
            time.sleep(0.01)
        seconds = _feed(pub, shots, count, window, lambda: received[0], 120)
    finally:
        reader.join(15)
        pull.close(linger=0)
        pub.close(1)
    return OutputBench("zeromq (push)", count, seconds, None, None)


def _bench_acked(output: NatsOutput | MqttOutput, label: str, shots: list[BestShot], count: int,
                 window: int) -> OutputBench:
    try:
        deadline = time.monotonic() + 15
        while not output.health()[0] and time.monotonic() < deadline:  # connected (NATS: first shot creates stream)
            time.sleep(0.05)
        base = output.counts.acked
        seconds = _feed(output, shots, count, window, lambda: output.counts.acked - base, 300)
        p50, p95 = _percentiles(output.ack_latency_s[-count:])
    finally:
        output.close(5)
    return OutputBench(label, count, seconds, p50, p95)


def bench_outputs(out: TextIO, count: int = 2000, window: int = 64, nats_url: str | None = None,
                  nats_replicas: int = 1, mqtt_addr: str | None = None) -> list[OutputBench]:
    shots = bench_shots()
    results = [_bench_zeromq(shots, count, window)]
    if nats_url is not None:
        stream = StreamSettings(name="BESTSHOT_BENCH", subjects=["bestshot.bench.>"], replicas=nats_replicas,
                                max_bytes=512 * 2**20, max_age_s=3600)
        results.append(_bench_acked(NatsOutput(NatsConfig(servers=nats_url.split(","), site="bench", stream=stream,
                                                          name="nats", allow_plaintext=True)),
                                    f"nats (R{nats_replicas})", shots, count, window))
    if mqtt_addr is not None:
        host, _, port = mqtt_addr.rpartition(":")
        results.append(_bench_acked(MqttOutput(MqttConfig(host=host or "127.0.0.1", port=int(port),
                                                          client_id="bestshot-bench", allow_plaintext=True)),
                                    "mqtt (QoS 1)", shots, count, window))
    size = sum(len(p) for p in (cv2.imencode(".jpg", shots[0].crop)[1], cv2.imencode(".jpg", shots[0].context)[1]))
    out.write(f"{count} shots each (~{size // 1024} KiB of JPEG + a 512-d embedding), at most {window} outstanding\n")
    out.write(f"{'output':<16} {'shots/s':>8} {'ack p50 ms':>11} {'ack p95 ms':>11}\n")
    for r in results:
        p50 = "-" if r.ack_ms_p50 is None else f"{r.ack_ms_p50:.1f}"
        p95 = "-" if r.ack_ms_p95 is None else f"{r.ack_ms_p95:.1f}"
        out.write(f"{r.output:<16} {r.shots_per_s:>8.0f} {p50:>11} {p95:>11}\n")
    return results
