"""NATS JetStream output: every best shot into a replicated, de-duplicated stream, acknowledged, nothing lost.

Message (schema 1), one per shot, on subject ``bestshot.<site>.<camera>``:
  headers  ``Nats-Msg-Id: <shot_id>`` (JetStream drops a second copy within the stream's duplicate window),
           ``Bestshot-Schema: 1``, ``Bestshot-Camera``, ``Bestshot-Track-Id``, ``Bestshot-Status``
  body     the ZeroMQ message's parts (zeromq.encode: topic, JSON metadata, face JPEG, context JPEG, [embedding]),
           framed as the spool frames them (spool.pack): ``BSS1``, part count (u32 LE), then per part its length
           (u64 LE) and bytes. The metadata is the second part: read two lengths, no image is decoded.
``decode_body`` turns a body back into a zeromq.Message.

Delivery: `submit` puts the shot in a bounded queue (full: dropped, counted) and returns; one thread runs an asyncio
loop that encodes, publishes and waits for the stream's ack, the oldest first. A failed attempt (no connection, a
leader election, an ack timeout) is retried with the same shot id, so a retry that reaches the stream twice is
stored once. While delivery fails the shot, and every one after it, waits in the on-disk spool (spool.py), which is
sent in order once the stream acks again, also by the next process on that folder. A shot the server refuses for
good (larger than its max_payload, rejected by the stream) is logged and counted as dropped.

The stream is created at the first connection, or checked when it exists: other subjects, replicas, retention,
max age, max bytes or duplicate window are an ERROR naming each difference, and nothing is published (shots wait in
the spool) until it is fixed; the check is repeated every RECHECK_S.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nats
import nats.errors
import nats.js.errors
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from agent.common.secrets import Secret, client_tls
from agent.pipeline.outputs.base import Counts
from agent.pipeline.outputs.exposure import in_clear
from agent.pipeline.outputs.spool import Spool, pack, unpack
from agent.pipeline.outputs.zeromq import Message, decode, encode
from agent.types import BestShot

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SUBJECT_PREFIX = "bestshot"
RECHECK_S = 10.0  # a conflicting stream (or none to be had) is looked at again after this long
LOG_EVERY_S = 30.0  # repeated connection errors are logged at most this often
BACKOFF_S = (0.05, 2.0)  # between two attempts of one shot: doubling from the first to the second


@dataclass
class StreamSettings:
    """The stream the shots are stored in; created as said here, or checked against it when it exists."""

    name: str = "BESTSHOT"
    subjects: list[str] = field(default_factory=lambda: [f"{SUBJECT_PREFIX}.>"])
    replicas: int = 1  # 3 in a 3-node cluster: a stored shot survives the loss of any one node
    retention: Literal["limits", "interest", "workqueue"] = "limits"
    max_age_s: float = 7 * 86400  # shots older than this are deleted (0: kept until max_bytes)
    max_bytes: int = 8 * 2**30  # the oldest shots are deleted above this (per replica)
    duplicate_window_s: float = 600.0  # a shot id seen within this window is stored once
    storage: Literal["file", "memory"] = "file"

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 5:
            raise ValueError(f"stream.replicas {self.replicas}: JetStream allows 1 to 5")
        if not self.subjects or self.duplicate_window_s <= 0 or self.max_age_s < 0:
            raise ValueError("stream: subjects must not be empty, duplicate_window_s must be positive and "
                             "max_age_s not negative")

    def to_nats(self) -> StreamConfig:
        return StreamConfig(name=self.name, subjects=list(self.subjects), num_replicas=self.replicas,
                            retention=RetentionPolicy(self.retention), max_age=self.max_age_s,
                            max_bytes=self.max_bytes, duplicate_window=self.duplicate_window_s,
                            storage=StorageType(self.storage))

    def conflicts(self, have: StreamConfig) -> list[str]:
        """How an existing stream differs from these settings (empty: it is the one wanted)."""
        want = self.to_nats()
        out = []
        for what, a, b in (("subjects", sorted(have.subjects or []), sorted(want.subjects)),
                           ("replicas", have.num_replicas, want.num_replicas),
                           ("retention", str(getattr(have.retention, "value", have.retention)), self.retention),
                           ("storage", str(getattr(have.storage, "value", have.storage)), self.storage),
                           ("max_bytes", have.max_bytes, want.max_bytes)):
            if a != b:
                out.append(f"{what} is {a}, configured {b}")
        for what, a, b in (("max_age_s", have.max_age or 0, want.max_age),
                           ("duplicate_window_s", have.duplicate_window or 0, want.duplicate_window)):
            if not math.isclose(a, b, abs_tol=1e-3):
                out.append(f"{what} is {a:g}, configured {b:g}")
        return out


@dataclass
class NatsConfig:
    """A NATS JetStream output (`type: nats` in `outputs:`).

    Faces leave the machine: a server other than loopback needs TLS (`tls_ca`, or tls:// URLs) unless
    allow_plaintext says otherwise. Credentials: `user` with `password`, or `token`, or `nkey_seed_file`, or
    `creds_file` (a decentralised-auth .creds file); password and token come from the environment or systemd
    credentials (agent/common/secrets.py), never from the YAML.
    """

    type: Literal["nats"] = "nats"
    name: str = "nats"  # the output's metrics label and /healthz key
    servers: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])  # any of the cluster's nodes
    site: str = "site"  # the subject's second token: bestshot.<site>.<camera>
    stream: StreamSettings = field(default_factory=StreamSettings)
    include_embedding: bool = True
    jpeg_quality: int = 90
    queue_size: int = 256  # shots waiting for the delivery thread; more are dropped (counted)
    ack_timeout_s: float = 5.0  # one attempt: publish and wait this long for the stream's ack
    spool_dir: Path | None = None  # where shots wait while the stream cannot ack (without: in memory, queue_size)
    spool_max_mb: float = 256.0  # the oldest spooled shots are deleted (and counted) above this
    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    nkey_seed_file: Path | None = None
    creds_file: Path | None = None
    tls_ca: Path | None = None  # CA bundle the servers' certificates are checked against
    tls_cert: Path | None = None  # client certificate and key, for servers that verify clients
    tls_key: Path | None = None
    allow_plaintext: bool = False

    def __post_init__(self) -> None:
        if not self.servers or any("://" not in s for s in self.servers):
            raise ValueError("servers: give nats://HOST:PORT (or tls://HOST:PORT) URLs")
        if not self.site or not all(c.isascii() and (c.isalnum() or c in "_-") for c in self.site):
            raise ValueError(f"site {self.site!r}: letters, digits, _ and - only (it is one subject token)")
        if (not 0 <= self.jpeg_quality <= 100 or self.queue_size < 1 or self.ack_timeout_s <= 0
                or self.spool_max_mb <= 0):
            raise ValueError("jpeg_quality must be in [0, 100]; queue_size, ack_timeout_s and spool_max_mb positive")
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together")
        if sum(x is not None for x in (self.user, self.token, self.nkey_seed_file, self.creds_file)) > 1:
            raise ValueError("choose one of user/password, token, nkey_seed_file or creds_file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if not self.allow_plaintext and (problem := self.plaintext_exposure()):
            raise ValueError(f"{problem}; set tls_ca, use servers on loopback, or accept it with "
                             "allow_plaintext: true")

    @property
    def encrypted(self) -> bool:
        return self.tls_ca is not None or all(s.startswith("tls://") for s in self.servers)

    def plaintext_exposure(self) -> str | None:
        """What is wrong when shots would cross the network unencrypted (exposure.py), else None."""
        if bad := [s for s in self.servers if in_clear(s, self.encrypted)]:
            return (f"NATS output {self.name!r}: {', '.join(bad)} can be reached from other machines without TLS: "
                    "best shots (faces, biometric data) would cross the network unencrypted")
        return None


def subject(site: str, camera: str) -> str:
    return f"{SUBJECT_PREFIX}.{site}.{camera}"


def decode_body(body: bytes) -> Message:
    """A message body back into its parts, checked as zeromq.decode checks them; ValueError when it is not one."""
    return decode(unpack(bytes(body)))


def _headers(parts: list[bytes]) -> dict[str, str]:
    meta = json.loads(parts[1])
    return {"Nats-Msg-Id": meta["shot_id"], "Bestshot-Schema": str(SCHEMA_VERSION), "Bestshot-Camera": meta["camera"],
            "Bestshot-Track-Id": str(meta["track_id"]), "Bestshot-Status": meta["status"]}


class StreamConflict(Exception):
    """The stream exists with other settings than configured."""


# a failed attempt worth repeating: no connection now, no stream leader now, no ack in time
TRANSIENT = (nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.ConnectionClosedError,
             nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError, nats.errors.NoServersError,
             nats.errors.OutboundBufferLimitError, nats.js.errors.NoStreamResponseError,
             nats.js.errors.ServiceUnavailableError, nats.js.errors.ServerError, OSError, StreamConflict)


@dataclass
class _Head:
    """The shot being delivered: its parts and how often it was tried; `spooled` when it is the spool's oldest."""

    parts: list[bytes]
    shot_id: str
    attempts: int = 0
    spooled: bool = False


class NatsOutput:
    """The Output (base.py) that publishes to a JetStream stream; see the module docstring.

    Beyond `counts`: `duplicates` (acks saying the stream already had that shot id: a retry whose first copy had
    arrived), `ack_latency_s` (publish-to-ack of the last acked shots, at most 1000), `spool_pending`."""

    def __init__(self, config: NatsConfig) -> None:
        self.config, self.name = config, config.name
        self.endpoint = f"{','.join(config.servers)} ({subject(config.site, '<camera>')})"
        self.counts = Counts()
        self.duplicates = 0
        self.ack_latency_s: list[float] = []
        self._options = self._connect_options()  # secrets and TLS files are read now: a problem stops the start
        self._spool = None if config.spool_dir is None else Spool(config.spool_dir, int(config.spool_max_mb * 2**20))
        self._queue: queue.Queue[tuple[BestShot, str]] = queue.Queue(config.queue_size)
        self._reason: str | None = "connecting"  # why it is not delivering now (None: it is)
        self._closing = threading.Event()
        self._close_by = math.inf
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._last_log: dict[str, float] = {}
        self._nc: nats.NATS | None = None  # set, like the rest below, on the delivery thread
        self._js: Any = None
        self._stream_ok, self._next_check = False, 0.0
        self._thread = threading.Thread(target=self._main, name=f"output-{self.name}", daemon=True)
        self._thread.start()
        log.info("NATS output %s: publishing to stream %s on %s%s", self.name, config.stream.name, self.endpoint,
                 f", spool {config.spool_dir}" if self._spool is not None else "")

    def _connect_options(self) -> dict[str, Any]:
        c = self.config
        opts: dict[str, Any] = {"servers": list(c.servers), "name": f"bestshot {c.site} {c.name}",
                                "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5, "connect_timeout": 2,
                                "error_cb": self._on_error, "disconnected_cb": self._on_disconnected,
                                "reconnected_cb": self._on_reconnected}
        if c.user is not None:
            opts |= {"user": c.user, "password": c.password.read(f"outputs {c.name}: password")}
        if c.token is not None:
            opts["token"] = c.token.read(f"outputs {c.name}: token")
        for key, path in (("nkeys_seed", c.nkey_seed_file), ("user_credentials", c.creds_file)):
            if path is not None:
                if importlib.util.find_spec("nkeys") is None:
                    raise ValueError(f"outputs {c.name}: nkey seeds and .creds files need the nkeys package: "
                                     "pip install 'bestshot-agent[nkeys]'")
                if not path.is_file():
                    raise ValueError(f"outputs {c.name}: {path} is not a readable file")
                opts[key] = str(path)
        if c.tls_ca is not None or c.tls_cert is not None:
            opts["tls"] = client_tls(c.tls_ca, c.tls_cert, c.tls_key, f"outputs {c.name}")
        return opts

    # --- the Output protocol, called from the pipeline's thread ---

    def submit(self, shot: BestShot, shot_id: str) -> bool:
        if self._closing.is_set():
            self.counts.add("dropped")
            return False
        try:
            self._queue.put_nowait((shot, shot_id))
        except queue.Full:
            self.counts.add("dropped")
            self._log_limited("full", logging.WARNING, "NATS output %s: %d shots waiting, shot of camera %s track %d "
                              "dropped (%d in all): %s", self.name, self.config.queue_size, shot.camera,
                              shot.track_id, self.counts.dropped, self._reason or "delivering too slowly")
            return False
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # closed meanwhile: the shot is in the queue, close() spools or counts it
            pass
        return True

    def health(self) -> tuple[bool, dict[str, Any]]:
        reason = self._reason
        details: dict[str, Any] = {"endpoint": self.endpoint, "spool_pending": self.spool_pending,
                                   "queued": self._queue.qsize(), "duplicates": self.duplicates}
        return reason is None, details if reason is None else {**details, "reason": reason}

    @property
    def spool_pending(self) -> int:
        return 0 if self._spool is None else len(self._spool)

    def close(self, timeout_s: float) -> None:
        """Deliver what waits for at most timeout_s (not at all while the stream cannot ack: the spool keeps it);
        what is left goes to the spool, or is counted as dropped without one."""
        if self._closing.is_set():
            return
        self._close_by = time.monotonic() + timeout_s
        self._closing.set()
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop has ended already
            pass
        self._thread.join(timeout_s + 5.0)
        c = self.counts
        log.info("NATS output %s closed: %d published, %d acked (%d duplicates), %d retried, %d spooled, %d dropped, "
                 "%d still in the spool", self.name, c.published, c.acked, self.duplicates, c.retried, c.spooled,
                 c.dropped, self.spool_pending)

    # --- the delivery thread ---

    def _log_limited(self, key: str, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log.get(key, -math.inf) >= LOG_EVERY_S:
            self._last_log[key] = now
            log.log(level, msg, *args)

    async def _on_error(self, e: Exception) -> None:
        self._reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        self._log_limited(f"error {type(e).__name__}", logging.WARNING, "NATS output %s: %s (%s); retrying",
                          self.name, self._reason, ",".join(self.config.servers))

    async def _on_disconnected(self) -> None:
        self._reason = "disconnected"
        if not self._closing.is_set():
                log.warning("NATS output %s: disconnected; reconnecting", self.name)

    async def _on_reconnected(self) -> None:
        if self._stream_ok:
            self._reason = None
        log.info("NATS output %s: reconnected to %s", self.name, self._nc.connected_url.netloc if self._nc else "?")

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._run())
        finally:  # nats-py's own tasks (reconnecting, reading) end with the loop
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def _run(self) -> None:
        head: _Head | None = None
        backoff, failing = BACKOFF_S[0], False
        connecting = asyncio.ensure_future(self._connect())
        try:
            while True:
                self._wake.clear()
                if self._spool is not None and (self._spool or (head is not None and head.attempts)):
                    head = self._to_spool(head)  # delivery is failing: everything after the oldest waits on disk
                if head is None:
                    head = self._next()
                if head is None:
                    if self._closing.is_set():
                        return
                    await self._sleep(1.0)
                    continue
                if self._closing.is_set() and (time.monotonic() >= self._close_by or (
                        failing and self._spool is not None and not (self._nc and self._nc.is_connected))):
                    return  # what is left waits in the spool for the next run
                failing = True
                if self._js is None or not await self._stream_ready():
                    if self._spool is not None:  # nothing can be delivered now: the shots wait on disk
                        head = self._to_spool(head)
                    await self._pause(0.2)
                    continue
                result = await self._attempt(head)
                if result == "retry":
                    await self._pause(backoff)
                    backoff = min(backoff * 2, BACKOFF_S[1])
                    continue
                if head.spooled:
                    self._spool.pop()
                head, backoff, failing = None, BACKOFF_S[0], False
        finally:
            self._leftovers(head)
            connecting.cancel()
            if self._nc is not None:
                try:
                    await asyncio.wait_for(self._nc.close(), 2.0)
                except (asyncio.TimeoutError, nats.errors.Error, OSError):  # the server went first
                    pass
            if self._spool is not None:
                self._spool.close()

    async def _pause(self, seconds: float) -> None:
        """Sleep between attempts: only close() ends it early (new shots do not bring the next attempt forward)."""
        end = time.monotonic() + seconds
        while not self._closing.is_set() and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.05))

    async def _sleep(self, seconds: float) -> None:
        """Sleep, woken early by a new shot or by close()."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _connect(self) -> None:
        """Connect once; nats-py then retries every server for ever and reconnects by itself (errors: _on_error)."""
        while not self._closing.is_set():
            try:
                self._nc = await nats.connect(**self._options)
            except (nats.errors.Error, OSError, asyncio.TimeoutError) as e:
                await self._on_error(e)
                await asyncio.sleep(1.0)
                continue
            self._js = self._nc.jetstream(timeout=self.config.ack_timeout_s)
            log.info("NATS output %s: connected to %s", self.name, self._nc.connected_url.netloc)
            await self._stream_ready()  # at start, not at the first shot: a conflict is reported at once
            self._wake.set()
            return

    async def _stream_ready(self) -> bool:
        """Create or check the stream: once, then again (after RECHECK_S) only while it is missing or conflicting."""
        if self._stream_ok:
            return True
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + RECHECK_S
        s = self.config.stream
        try:
            try:
                info = await self._js.stream_info(s.name)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(s.to_nats())
                log.info("NATS output %s: stream %s created (subjects %s, %d replica(s))", self.name, s.name,
                         ", ".join(s.subjects), s.replicas)
            else:
                if problems := s.conflicts(info.config):
                    raise StreamConflict(f"stream {s.name} exists with other settings: {'; '.join(problems)} (change "
                                         "the stream, or the output's `stream` settings to match)")
        except StreamConflict as e:
            self._reason = str(e)
            log.error("NATS output %s: %s; shots wait%s", self.name, e,
                      " in the spool" if self._spool is not None else " in memory")
            return False
        except (*TRANSIENT, nats.js.errors.APIError) as e:
            self._reason = f"stream {s.name} not available: {type(e).__name__} {e}".rstrip()
            if getattr(e, "err_code", None) == 10047:  # the server cannot reserve the stream's limits
                self._reason += (f" (stream.max_bytes {s.max_bytes} per replica is more than the server's JetStream "
                                 "storage allows: lower it, or raise the server's max_file_store)")
            self._log_limited("stream", logging.WARNING, "NATS output %s: %s; retrying", self.name, self._reason)
            if isinstance(e, TRANSIENT):
                self._next_check = now + 1.0
            return False
        self._stream_ok, self._reason = True, None
        return True

    async def _attempt(self, head: _Head) -> Literal["acked", "dropped", "retry"]:
        self.counts.add("published" if head.attempts == 0 else "retried")
        head.attempts += 1
        t0 = time.monotonic()
        subj = subject(self.config.site, json.loads(head.parts[1])["camera"])
        try:
            ack = await self._js.publish(subj, pack(head.parts), timeout=self.config.ack_timeout_s,
                                         headers=_headers(head.parts))
        except TRANSIENT as e:
            self._reason = f"no ack: {type(e).__name__} {e}".rstrip()
            self._log_limited("attempt", logging.WARNING, "NATS output %s: shot %s attempt %d: %s; retrying with the "
                              "same id", self.name, head.shot_id, head.attempts, self._reason)
            if isinstance(e, nats.js.errors.NoStreamResponseError):
                self._stream_ok, self._next_check = False, 0.0  # no stream listens on the subject: check it again
            return "retry"
        except (nats.errors.MaxPayloadError, nats.js.errors.APIError, nats.errors.Error) as e:
            self.counts.add("dropped")
            log.error("NATS output %s: shot %s (%d bytes) refused for good, dropped: %s %s", self.name, head.shot_id,
                      len(pack(head.parts)), type(e).__name__, e)
            return "dropped"
        self.ack_latency_s = [*self.ack_latency_s[-999:], time.monotonic() - t0]
        self.counts.add("acked")
        if ack.duplicate:
            self.duplicates += 1
        if self._reason is not None:
            log.info("NATS output %s: delivering (stream %s, seq %d)", self.name, ack.stream, ack.seq)
        self._reason = None
        return "acked"

    def _next(self) -> _Head | None:
        """The next shot: the spool's oldest, else the queue's (encoded here, off the pipeline's thread)."""
        if self._spool is not None and (parts := self._spool.peek()) is not None:
            return _Head(parts, json.loads(parts[1]).get("shot_id", ""), spooled=True)
        try:
            shot, shot_id = self._queue.get_nowait()
        except queue.Empty:
            return None
        c = self.config
        return _Head(encode(shot, c.include_embedding, c.jpeg_quality, shot_id), shot_id)

    def _to_spool(self, head: _Head | None) -> _Head | None:
        """Move the shot being tried (unless it is the spool's already) and every queued one to the spool, in order."""
        items = [] if head is None or head.spooled else [head]
        while True:
            try:
                shot, shot_id = self._queue.get_nowait()
            except queue.Empty:
                break
            items.append(_Head(encode(shot, self.config.include_embedding, self.config.jpeg_quality, shot_id),
                               shot_id))
        for item in items:
            try:
                if self._spool.put(item.parts):
                    self.counts.add("spooled")
                    if item is head:
                        head.spooled = True
                    continue
                log.error("NATS output %s: shot %s is larger than the spool's cap; dropped", self.name, item.shot_id)
            except OSError as e:
                log.error("NATS output %s: spool %s: cannot write shot %s: %s", self.name, self._spool.dir,
                          item.shot_id, e)
            self.counts.add("dropped")
            if item is head:
                head = None
        return head

    def _leftovers(self, head: _Head | None) -> None:
        """At close: what was not acked goes to the spool, or is counted as dropped."""
        if self._spool is not None:
            self._to_spool(head)
            return
        lost = (head is not None) + self._queue.qsize()
        if lost:
            self.counts.add("dropped", lost)
            log.warning("NATS output %s: %d shot(s) not delivered at close and no spool: lost", self.name, lost)
