"""Publishing best shots over ZeroMQ: the wire format (encode/decode) and a publisher that never blocks the pipeline.

One multipart message per shot:
  0. topic ``bestshot.<camera>`` (utf-8; SUB sockets filter on its prefix)
  1. JSON metadata (utf-8) with ``"schema": SCHEMA_VERSION``, the ``model_id`` that scored it and the
     ``agent_version`` that sent it
  2. aligned face crop, JPEG
  3. context crop, JPEG
  4. dense embedding, float32 little-endian; present only when the metadata has ``embedding_dim``

The metadata's ``shot_id`` (when the sender has one: agent/pipeline/outputs/base.py) is the same for every output
and every retry of one shot: consumers de-duplicate on it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from agent import __version__
from agent.common.keys import AllowList, check_secret_file, load_authorized_keys
from agent.pipeline.outputs.base import Counts
from agent.pipeline.outputs.spool import Spool
from agent.types import BestShot

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TOPIC_PREFIX = "bestshot."
EMBEDDING_DTYPE = "float32-le"
DROP_LOG_INTERVAL_S = 10.0
_REQUIRED = {"camera": str, "track_id": int, "status": str, "frame_index": int}


@dataclass
class Message:
    """A decoded best-shot message; the JPEGs stay encoded (cv2.imdecode them when needed)."""

    topic: str
    meta: dict[str, Any]
    face_jpeg: bytes
    context_jpeg: bytes
    embedding: np.ndarray | None  # float32, native byte order


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _jpeg(img: np.ndarray, quality: int, what: str) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"cannot JPEG-encode the {what} ({img.shape} {img.dtype})")
    return buf.tobytes()


def _size(img: np.ndarray) -> list[int]:
    return [int(img.shape[1]), int(img.shape[0])]  # width, height


def encode(shot: BestShot, include_embedding: bool, jpeg_quality: int = 90, shot_id: str | None = None) -> list[bytes]:
    """The multipart message of one shot (see the module docstring)."""
    emb = np.asarray(shot.embedding, dtype="<f4").ravel() if include_embedding else None
    meta: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "camera": shot.camera,
        "track_id": int(shot.track_id),
        "status": shot.status,
        "timestamps": {"first_seen": float(shot.first_seen), "best": float(shot.best_time),
                       "last_seen": float(shot.last_seen)},  # pts seconds
        "published_at": time.time(),  # unix wall time
        "frame_index": int(shot.frame_index),
        "bbox": [round(float(v), 2) for v in np.asarray(shot.bbox).ravel()],
        "landmarks": None if shot.landmarks is None
        else [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(shot.landmarks).reshape(-1, 2)],
        "quality": float(shot.quality),
        "drift": float(shot.drift),
        "prefiqs": float(shot.prefiqs),
        "det_score": float(shot.det_score),
        "frames_seen": int(shot.frames_seen),
        "frames_scored": int(shot.frames_scored),
        "model_id": shot.model_id,
        "agent_version": __version__,  # which build produced the shot (with model_id: which model scored it)
        "face_size": _size(shot.crop),
        "context_size": _size(shot.context),
        "extra": shot.extra,
    }
    if shot_id is not None:
        meta["shot_id"] = shot_id
    if emb is not None:
        meta |= {"embedding_dim": int(emb.size), "embedding_dtype": EMBEDDING_DTYPE}
    parts = [
        f"{TOPIC_PREFIX}{shot.camera}".encode(),
        json.dumps(meta, default=_json_default, separators=(",", ":")).encode(),
        _jpeg(shot.crop, jpeg_quality, "face crop"),
        _jpeg(shot.context, jpeg_quality, "context crop"),
    ]
    return parts if emb is None else [*parts, emb.tobytes()]


def decode(parts: list[bytes]) -> Message:
    """Parse and check one multipart message; any problem raises ValueError naming it."""
    if len(parts) not in (4, 5):
        raise ValueError(f"expected 4 or 5 message parts, got {len(parts)}")
    try:
        topic = bytes(parts[0]).decode()
        meta = json.loads(bytes(parts[1]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable topic or metadata: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"metadata is a JSON {type(meta).__name__}, not an object")
    if meta.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"schema version {meta.get('schema')!r}, this reader knows {SCHEMA_VERSION}")
    if bad := [k for k, t in _REQUIRED.items() if not isinstance(meta.get(k), t)]:
        raise ValueError(f"metadata lacks or mistypes {', '.join(bad)}")
    if topic != f"{TOPIC_PREFIX}{meta['camera']}":
        raise ValueError(f"topic {topic!r} does not match camera {meta['camera']!r}")
    dim = meta.get("embedding_dim")
    embedding = None
    if len(parts) == 5:
        if meta.get("embedding_dtype") != EMBEDDING_DTYPE or not isinstance(dim, int) or len(parts[4]) != 4 * dim:
            raise ValueError(f"embedding part of {len(parts[4])} bytes does not match embedding_dim {dim!r} "
                             f"and dtype {meta.get('embedding_dtype')!r}")
        embedding = np.frombuffer(parts[4], dtype="<f4").astype(np.float32)
    elif dim is not None:
        raise ValueError(f"metadata announces a {dim}-d embedding but the message has none")
    return Message(topic, meta, bytes(parts[2]), bytes(parts[3]), embedding)


class BindError(OSError):
    """The publisher could not bind its endpoint (in use, bad address, no permission)."""


@dataclass
class PublisherConfig:
    """Where and how to publish. The publisher binds; consumers connect.

    mode "pub": any number of SUB consumers, each filtering on ``bestshot.<camera>``; a slow or absent
    subscriber loses messages silently (ZeroMQ PUB drops above the HWM per subscriber and never says so).
    mode "push": PUSH to PULL consumers (load-balanced if several); with no consumer, or all of them full,
    the send reports it and the shot counts as dropped, or, with a spool, waits on disk until one can take it.

    CURVE (both keys set): the socket encrypts, and only clients whose public key is a ``*.key`` file in
    ``curve_authorized_keys_dir`` may connect; plain-text clients are refused.
    """

    endpoint: str = "tcp://127.0.0.1:5556"  # tcp://host:port (port * = any free one) or ipc:///path
    name: str = "zeromq"  # the output's name: its metrics label and /healthz key
    mode: Literal["pub", "push"] = "pub"
    sndhwm: int = 1000  # messages queued per peer before ZeroMQ drops (pub) or refuses (push)
    include_embedding: bool = True
    jpeg_quality: int = 90
    linger_ms: int = 1000  # how long close() may wait to flush queued messages
    curve_secret_key: Path | None = None  # the server's .key_secret file (mode 0600)
    curve_authorized_keys_dir: Path | None = None  # folder of allowed clients' public .key files
    spool_dir: Path | None = None  # push mode: where shots wait while no consumer can take them
    spool_max_bytes: int = 256 * 2**20  # oldest spooled shots are deleted (and counted) above this

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("tcp://", "ipc://")):
            raise ValueError(f"endpoint {self.endpoint!r}: only tcp:// and ipc:// are supported")
        if self.mode not in ("pub", "push"):
            raise ValueError(f"mode {self.mode!r}: expected 'pub' or 'push'")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality {self.jpeg_quality} is not in [0, 100]")
        if (self.curve_secret_key is None) != (self.curve_authorized_keys_dir is None):
            raise ValueError("CURVE needs both curve_secret_key and curve_authorized_keys_dir")
        if self.spool_dir is not None and self.mode != "push":
            raise ValueError("a spool needs mode 'push' (PUB drops for slow subscribers without telling the sender)")
        if self.spool_max_bytes <= 0:
            raise ValueError(f"spool_max_bytes {self.spool_max_bytes} must be positive")


def _check_ipc_free(endpoint: str) -> None:
    """ZeroMQ silently unlinks and takes over an ipc path that another process is serving; refuse instead."""
    path = endpoint.removeprefix("ipc://")
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return  # stale file left by a dead process (or not a socket: the bind will say so)
    raise BindError(f"cannot bind {endpoint}: address already in use")


def is_ipv6(endpoint: str) -> bool:
    """True for a bracketed IPv6 endpoint (tcp://[::1]:5556): ZeroMQ binds and connects to those only with its IPV6
    option set."""
    return "[" in endpoint


class Publisher:
    """Binds a PUB (or PUSH) socket and sends best shots without ever blocking the caller.

    Counters: ``published`` (messages ZeroMQ accepted, spooled ones included once sent), ``bytes`` (their size),
    ``dropped`` (shots lost here: in push mode without a spool, no consumer connected or all of them full; with a
    spool, a write that failed), ``spooled`` (shots written to the spool), ``spool_dropped`` (spooled shots deleted
    unsent: the oldest above the size cap, or unreadable), ``spool_bytes`` / ``spool_pending`` (what waits now).
    In pub mode ZeroMQ drops per slow subscriber without telling the sender, so those losses are invisible here.

    With a spool, call pump() regularly: it sends waiting shots, in order, once a consumer can take them. Shots
    still spooled at close() stay on disk for the next Publisher on that folder. Shots ZeroMQ has accepted (at most
    ``sndhwm`` per consumer) are in its queue, not on disk: a consumer dying, or close() giving up after linger_ms,
    loses those.

    Without a ``context`` it owns one, so that close() can wait (at most linger_ms) for queued messages to leave.
    With CURVE, the context gets this publisher's ZAP authenticator: one CURVE publisher per context.
    Not thread-safe (neither are ZeroMQ sockets): create, use and close it from one thread.
    """

    def __init__(self, config: PublisherConfig, context: zmq.Context | None = None) -> None:
        self.config, self.name = config, config.name
        self.counts = Counts()  # published, dropped, spooled (ZeroMQ acknowledges nothing: acked, retried stay 0)
        self.bytes = 0
        self._unlogged_drops = 0
        self._last_drop_log = -math.inf
        if config.endpoint.startswith("ipc://"):
            _check_ipc_free(config.endpoint)
        keys = None if config.curve_secret_key is None else check_secret_file(config.curve_secret_key)
        self._spool = None if config.spool_dir is None else Spool(config.spool_dir, config.spool_max_bytes)
        self._own_ctx = context is None
        self._ctx = context or zmq.Context(io_threads=1)
        self._auth: ThreadAuthenticator | None = None
        self._keys = keys
        self._allowed: frozenset[bytes] = frozenset()  # the validated allow-list ZAP enforces
        self._revoked = threading.Event()  # set by reload_authorized_keys, acted on by pump() on this thread
        self._sock = self._socket()
        try:
            if keys is not None:
                self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(f"{__name__}.auth"))
                self._auth.start()
                self.reload_authorized_keys()
            try:
                self._sock.bind(config.endpoint)
            except zmq.ZMQError as e:
                raise BindError(f"cannot bind {config.endpoint}: {e.strerror}") from e
        except BaseException:
            self._teardown(0)
            raise
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port when bound to *
        log.info("publishing best shots (%s%s%s) on %s", config.mode, ", CURVE" if keys else "",
                 f", spool {config.spool_dir}" if self._spool is not None else "", self.endpoint)

    def _socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.PUB if self.config.mode == "pub" else zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.config.sndhwm)
        sock.setsockopt(zmq.IPV6, is_ipv6(self.config.endpoint))
        sock.setsockopt(zmq.LINGER, self.config.linger_ms)
        if self._keys is not None:
            sock.curve_publickey, sock.curve_secretkey = self._keys
            sock.curve_server = True
        return sock

    def _rebind(self) -> None:
        """A key was revoked: ZAP checks only new handshakes, so drop every connection (a new socket on the same
        endpoint); allowed clients reconnect by themselves and are checked against the new list."""
        self._sock.unbind(self.endpoint)
        self._sock.close(linger=0)
        self._sock = self._socket()
        deadline = time.monotonic() + 2.0
        while True:  # ZeroMQ releases the old listener on its I/O thread: moments later
            try:
                self._sock.bind(self.endpoint)
                break
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise BindError(f"cannot bind {self.endpoint} again after a revocation: {e.strerror}") from e
                time.sleep(0.01)
        log.info("%s: connections dropped after a key was revoked; allowed clients reconnect", self.endpoint)

    @property
    def published(self) -> int:
        return self.counts.published

    @property
    def dropped(self) -> int:
        return self.counts.dropped

    @property
    def spooled(self) -> int:
        return self.counts.spooled

    @property
    def spool_dropped(self) -> int:
        return 0 if self._spool is None else self._spool.dropped

    @property
    def spool_bytes(self) -> int:
        return 0 if self._spool is None else self._spool.bytes

    @property
    def spool_pending(self) -> int:
        return 0 if self._spool is None else len(self._spool)

    def reload_authorized_keys(self) -> int:
        """Re-read the allow-list directory (call it on SIGHUP; safe from another thread, it does not touch the socket);
        the number of allowed client keys. The set read here is the one logged and the one ZAP enforces. When a key
        was removed, the next pump() drops every connection so that revoked clients are cut off at once.
        A bad file raises KeyFileError and keeps the previous list."""
        if self._auth is None:
            return 0
        keys = frozenset(load_authorized_keys(self.config.curve_authorized_keys_dir))
        revoked = self._allowed - keys
        self._allowed = keys
        self._auth.configure_curve_callback(domain="*", credentials_provider=AllowList(keys))
        n = len(keys)
        log.log(logging.INFO if n else logging.WARNING, "CURVE allow-list %s: %d client key(s)%s%s",
                self.config.curve_authorized_keys_dir, n, "" if n else ": every subscriber will be refused",
                f"; {len(revoked)} revoked: their connections are dropped" if revoked else "")
        if revoked:
            self._revoked.set()
        return n

    def publish(self, shot: BestShot, shot_id: str | None = None) -> bool:
        """Send one shot without blocking. Without a spool, False (counted as dropped) when ZeroMQ cannot take it
        now. With one, the shot is sent, or spooled behind those already waiting (True); False if that fails."""
        if self._spool is None:
            if not self._sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT:  # no peer able to take it: skip encoding
                return self._drop()
            return self._send(encode(shot, self.config.include_embedding, self.config.jpeg_quality,
                                     shot_id)) or self._drop()
        self.pump()
        parts = encode(shot, self.config.include_embedding, self.config.jpeg_quality, shot_id)
        if not self._spool and self._send(parts):
            return True
        try:
            if not self._spool.put(parts):
                log.error("spool %s: a %d-byte shot is larger than the cap; deleted", self._spool.dir,
                          sum(len(p) for p in parts))
                return False
        except OSError as e:
            log.error("spool %s: cannot write: %s", self._spool.dir, e)
            return self._drop()
        if len(self._spool) == 1:
            log.info("%s: no consumer can take best shots now; spooling them in %s", self.endpoint, self._spool.dir)
        self.counts.add("spooled")
        return True

    def pump(self, max_messages: int = 64) -> int:
        """Send up to max_messages spooled shots, oldest first, while a consumer can take them; never blocks.
        Returns how many were sent. Also where a revocation takes effect (see reload_authorized_keys)."""
        if self._revoked.is_set():
            self._revoked.clear()
            self._rebind()
        sent = 0
        while (self._spool and sent < max_messages and self._sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT
               and (parts := self._spool.peek()) is not None and self._send(parts)):
            self._spool.pop()
            sent += 1
        if sent and not self._spool:
            log.info("%s: spool drained", self.endpoint)
        return sent

    def _send(self, parts: list[bytes]) -> bool:
        try:
            self._sock.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.counts.add("published")
        self.bytes += sum(len(p) for p in parts)
        return True

    def _drop(self) -> bool:
        """Count one lost shot (logged at most every DROP_LOG_INTERVAL_S); returns False, publish()'s answer."""
        self.counts.add("dropped")
        self._unlogged_drops += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            log.warning("%s: %d best shot(s) dropped since the last report (%d in all): no consumer keeping up",
                        self.endpoint, self._unlogged_drops, self.dropped)
            self._last_drop_log, self._unlogged_drops = now, 0
        return False

    def _teardown(self, linger_ms: int) -> None:
        self._sock.close(linger=linger_ms)
        if self._auth is not None:
            self._auth.stop()
        if self._own_ctx:
            self._ctx.term()
        if self._spool is not None:
            self._spool.close()

    # the Output protocol (agent/pipeline/outputs/base.py): sends happen on the caller's thread, never blocking
    submit = publish
    tick = pump

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"endpoint": self.endpoint, "spool_pending": self.spool_pending}

    def close(self, timeout_s: float | None = None) -> None:
        """Close the socket; with its own context, wait at most linger_ms (or timeout_s if shorter) for queued
        messages to leave. Spooled shots stay on disk."""
        if not self._sock.closed:
            linger = self.config.linger_ms if timeout_s is None else min(self.config.linger_ms, int(timeout_s * 1000))
            self._teardown(linger)
            log.info("publisher %s closed: %d published (%d bytes), %d dropped, %d spooled, %d still in the spool, "
                     "%d deleted from it", self.endpoint, self.published, self.bytes, self.dropped, self.spooled,
                     self.spool_pending, self.spool_dropped)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
