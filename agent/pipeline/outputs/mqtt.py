"""MQTT output for NVR and home-automation users (Frigate's conventions where they exist), over paho-mqtt 2.x.

Topics (prefix `bestshot` by default):
  <prefix>/<camera>/events     JSON, QoS 1, not retained: {"type": "new" | "update" | "end", "before": the track's
                               previous event's shot or null, "after": this shot}; a shot is the ZeroMQ message's
                               metadata (shot_id, track_id, status, quality, timestamps, bbox, ...), with
                               "embedding" (a list of floats) only when include_embedding is set. A track's first
                               shot is "new" (followed by "end" when it is already the final one), later updates
                               "update", the final shot (status best or unrecognisable) "end".
  <prefix>/<camera>/snapshot   the latest shot's JPEG (context crop, or the aligned face), raw bytes, QoS 1, retained
  <prefix>/available           "online" (retained) while connected; the broker sets "offline" (the last will) when
                               the agent vanishes, and close() sets it too

`submit` hands both messages to paho without blocking; paho's own thread connects, reconnects (1 to 30 s) and sends,
keeping up to queue_size messages while the broker is away (more are dropped, counted). `acked` counts PUBACKs.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.common.secrets import Secret, client_tls
from agent.pipeline.outputs.base import Counts
from agent.pipeline.outputs.exposure import in_clear
from agent.pipeline.outputs.zeromq import encode
from agent.types import BestShot

log = logging.getLogger(__name__)

OPEN_TRACKS = 10_000  # tracks whose last event is remembered (for "before" and new/update); the oldest forgotten


@dataclass
class MqttConfig:
    """An MQTT output (`type: mqtt` in `outputs:`). A broker other than loopback needs TLS (tls_ca) unless
    allow_plaintext says otherwise; the password comes from the environment or systemd credentials."""

    type: Literal["mqtt"] = "mqtt"
    name: str = "mqtt"  # the output's metrics label and /healthz key
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "bestshot"
    client_id: str | None = None  # default bestshot-<hostname>-<name>
    keepalive_s: int = 30
    snapshot: Literal["context", "face"] = "context"
    include_embedding: bool = False
    jpeg_quality: int = 90
    queue_size: int = 1000  # messages paho keeps while the broker is away or slow; more are dropped
    username: str | None = None
    password: Secret | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_plaintext: bool = False

    def __post_init__(self) -> None:
        if not self.topic_prefix or any(c in self.topic_prefix for c in "#+") or not 0 < self.port < 65536:
            raise ValueError("topic_prefix must be set without # or +, and port within 1-65535")
        if (self.username is None) != (self.password is None) or (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("username and password go together, and so do tls_cert and tls_key")
        if not self.allow_plaintext and (problem := self.plaintext_exposure()):
            raise ValueError(f"{problem}; set tls_ca, use a broker on loopback, or accept it with "
                             "allow_plaintext: true")

    def plaintext_exposure(self) -> str | None:
        if in_clear(f"mqtt://{self.host}:{self.port}", self.tls_ca is not None):
            return (f"MQTT output {self.name!r}: {self.host}:{self.port} can be reached from other machines without "
                    "TLS: best shots (faces) would cross the network unencrypted")
        return None


class MqttOutput:
    """The Output (base.py) that publishes events and snapshots to an MQTT broker; see the module docstring."""

    def __init__(self, config: MqttConfig) -> None:
        self.config, self.name = config, config.name
        self.endpoint = f"mqtt{'s' if config.tls_ca else ''}://{config.host}:{config.port}/{config.topic_prefix}"
        self.counts = Counts()
        self.availability = f"{config.topic_prefix}/available"
        self._tracks: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()
        self._reason: str | None = "connecting"
        self._closing = False
        self._lock = threading.Lock()  # never held while calling paho, whose thread calls on_publish holding its own
        self._pending: dict[int, str | None] = {}  # message id -> its shot's id (None: not counted), until its PUBACK
        self._early: set[int] = set()  # PUBACKs that came before submit() registered their message ids
        self._unacked: dict[str, list] = {}  # shot id -> [its messages not acked yet, when it was submitted]
        self.ack_latency_s: list[float] = []  # submit-to-PUBACK of the last acked shots, at most 1000
        client_id = config.client_id or f"bestshot-{socket.gethostname()}-{config.name}"
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if config.username is not None:
            c.username_pw_set(config.username, config.password.read(f"outputs {config.name}: password"))
        if config.tls_ca is not None:
            c.tls_set_context(client_tls(config.tls_ca, config.tls_cert, config.tls_key, f"outputs {config.name}"))
        c.max_queued_messages_set(config.queue_size)
        c.reconnect_delay_set(1, 30)
        c.will_set(self.availability, "offline", qos=1, retain=True)
        c.on_connect, c.on_disconnect, c.on_publish = self._on_connect, self._on_disconnect, self._on_publish
        c.enable_logger(logging.getLogger(f"{__name__}.paho"))
        self._client = c
        c.connect_async(config.host, config.port, config.keepalive_s)
        c.loop_start()
        log.info("MQTT output %s: publishing events and snapshots on %s", self.name, self.endpoint)

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._reason = f"refused by the broker: {reason}"
            log.error("MQTT output %s: %s: %s (retrying)", self.name, self.endpoint, self._reason)
            return
        self._reason = None
        mid = client.publish(self.availability, "online", qos=1, retain=True).mid  # its PUBACK comes on this thread
        with self._lock:
            self._pending[mid] = None
        log.info("MQTT output %s: connected to %s", self.name, self.endpoint)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self._reason is None and not self._closing:
            self._reason = f"disconnected: {reason}"
            log.warning("MQTT output %s: %s; reconnecting", self.name, self._reason)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: Any, _props: Any) -> None:
        with self._lock:
            if mid not in self._pending:
                self._early.add(mid)
            elif (shot_id := self._pending.pop(mid)) is not None and not reason.is_failure:
                self._acked_one(shot_id)

    def _acked_one(self, shot_id: str) -> None:
        entry = self._unacked[shot_id]
        entry[0] -= 1
        if not entry[0]:  # every message of the shot is with the broker
            del self._unacked[shot_id]
            self.ack_latency_s = [*self.ack_latency_s[-999:], time.monotonic() - entry[1]]
            self.counts.add("acked")

    def _events(self, shot: BestShot, meta: dict[str, Any]) -> list[dict[str, Any]]:
        key = (shot.camera, shot.track_id)
        before = self._tracks.pop(key, None)
        final = shot.status != "update"
        if before is None:
            out = [{"type": "new", "before": None, "after": meta}]
            if final:
                out.append({"type": "end", "before": meta, "after": meta})
        else:
            out = [{"type": "end" if final else "update", "before": before, "after": meta}]
        if not final:
            self._tracks[key] = meta
            while len(self._tracks) > OPEN_TRACKS:
                self._tracks.popitem(last=False)
        return out

    def submit(self, shot: BestShot, shot_id: str) -> bool:
        c = self.config
        parts = encode(shot, c.include_embedding, c.jpeg_quality, shot_id)
        meta = json.loads(parts[1])
        if c.include_embedding:
            meta["embedding"] = np.frombuffer(parts[4], "<f4").round(6).tolist()
        base = f"{c.topic_prefix}/{shot.camera}"
        messages = [(f"{base}/events", json.dumps(e, separators=(",", ":")).encode(), False)
                    for e in self._events(shot, meta)]
        messages.append((f"{base}/snapshot", parts[3] if c.snapshot == "context" else parts[2], True))
        t0 = time.monotonic()
        queued = [self._client.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in messages]
        mids = [i.mid for i in queued if i.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)]  # no conn: queued
        complete = len(mids) == len(messages)  # else the shot counts as dropped, never as acked
        with self._lock:
            if complete:
                self._unacked[shot_id] = [len(mids), t0]
            for mid in mids:
                if mid not in self._early:
                    self._pending[mid] = shot_id if complete else None
                elif complete:
                    self._early.discard(mid)
                    self._acked_one(shot_id)
                else:
                    self._early.discard(mid)
        if not complete:
            self.counts.add("dropped")
            log.warning("MQTT output %s: shot %s of camera %s: %d of its %d messages not queued, %d waiting (%s)",
                        self.name, shot_id, shot.camera, len(messages) - len(mids), len(messages), len(self._pending),
                        self._reason or "broker slow")
            return False
        self.counts.add("published")
        return True

    def health(self) -> tuple[bool, dict[str, Any]]:
        details: dict[str, Any] = {"endpoint": self.endpoint, "unacked": len(self._pending)}
        return self._reason is None, details if self._reason is None else {**details, "reason": self._reason}

    def close(self, timeout_s: float) -> None:
        """Wait at most timeout_s for PUBACKs of what was sent, say "offline", disconnect."""
        deadline = time.monotonic() + timeout_s
        self._closing = True
        while self._pending and self._reason is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._reason is None:
            info = self._client.publish(self.availability, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError):  # the connection went meanwhile: the last will says it
                pass
        self._client.disconnect()
        self._client.loop_stop()
        log.info("MQTT output %s closed: %d shots published, %d acked, %d messages unacked, %d dropped", self.name,
                 self.counts.published, self.counts.acked, len(self._pending), self.counts.dropped)
