"""The live page: each camera's status and latest best shots in a browser, updated as they are published.

`LiveView.add(message)` takes a decoded best-shot message (agent/pipeline/outputs/zeromq.py): the agent feeds it its
own shots (`add_shot`), `bestshot subscribe --view` the ones it receives, so both serve the same page. It keeps the
last `history` shots per camera in memory only (nothing is written to disk; the page's answers say `no-store`).
`LiveView.handle(handler, path)` answers the page's routes on an http.server handler (the metrics listener):
`/` (live.html), `/live.js`, `/live/events` (server-sent events: the whole state, then each shot and a status every
`status_interval_s`), `/live/shot/<seq>/face.jpg` and `/context.jpg`.

Nothing here can hold up the pipeline: `add()` hands each page a ready-made event through the page's bounded queue
without waiting; a page whose queue is full is cut off (its browser reconnects and gets the whole state again), and
a write to a page that does not read fails after the server's socket timeout.

Faces are biometric data: with a `token`, every route needs it, as the password of HTTP basic auth (any user name) or
as `Authorization: Bearer <token>`. `exposure_problems` is the rule for where the page may listen (README, "Live
page"). No camera URL is ever sent: errors are shown with any `user:password@` removed.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from importlib import resources
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.pipeline.outputs.exposure import is_local
from agent.pipeline.outputs.zeromq import Message, decode, encode
from agent.service.metrics import source_counts
from agent.types import BestShot

log = logging.getLogger(__name__)

StatusFn = Callable[[], dict[str, dict[str, Any]]]
_SHOT_PATH = re.compile(r"^/live/shot/(\d+)/(face|context)\.jpg$")
_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")
_STATIC = {"/": ("live.html", "text/html; charset=utf-8"), "/live.js": ("live.js", "text/javascript; charset=utf-8")}
_HEADERS = {  # faces: never cached, never framed, never sent elsewhere; only this page's own script runs
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self'; "
                               "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def redact(text: str | None) -> str | None:
    """`text` without the credentials of any URL in it (rtsp://user:pass@host -> rtsp://***@host)."""
    return None if text is None else _CREDENTIALS.sub("***@", text)


def exposure_problems(listen: str, token: bool, allow_plaintext: bool, where: str = "live") -> list[str]:
    """What is wrong with serving the page on HOST:PORT `listen` (empty host: every interface): reachable from other
    machines it needs a token and, the page having no TLS, `allow_plaintext` (faces in clear on the network)."""
    if is_local(f"tcp://{listen}"):
        return []
    problems = []
    if not token:
        problems.append(f"{where}.token: the live page on {listen} can be reached from other machines and needs a "
                        "token (from systemd credentials or the environment)")
    if not allow_plaintext:
        problems.append(f"{where}.allow_plaintext: the live page on {listen} would send faces unencrypted over HTTP; "
                        "listen on 127.0.0.1 (an SSH tunnel or a TLS proxy in front), or accept it with "
                        f"{where}.allow_plaintext: true")
    return problems


def read_token(credential: str | None = None, env: str | None = None) -> str:
    """The page's token: the file `credential` in $CREDENTIALS_DIRECTORY (systemd LoadCredential=) or the environment
    variable `env`. ValueError naming what is missing or empty."""
    if credential is not None:
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            raise ValueError(f"live.token.credential {credential!r}: $CREDENTIALS_DIRECTORY is not set (not started "
                             "by systemd with LoadCredential=?)")
        try:
            token = (Path(folder) / credential).read_text().strip()
        except OSError as e:
            raise ValueError(f"live.token.credential {credential!r}: cannot read it: {e.strerror or e}") from e
        where = f"credential {credential!r}"
    elif env is not None:
        token, where = os.environ.get(env, "").strip(), f"environment variable {env}"
    else:
        raise ValueError("live.token: name a credential or an environment variable")
    if len(token) < 16:
        raise ValueError(f"live.token: the {where} is unset or shorter than 16 characters")
    return token


@dataclass
class _Shot:
    seq: int
    camera: str
    meta: dict[str, Any]  # what the page shows (the message's metadata, without the template vector)
    face: bytes
    context: bytes


class _Page:
    """One connected page: its bounded queue of encoded events, and whether it fell behind."""

    def __init__(self, size: int):
        self.events: queue.Queue[bytes] = queue.Queue(size)
        self.behind = False

    def put(self, event: bytes) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:
            self.behind = True


def _event(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class PipelineStatus:
    """Each running camera's status from the pipeline: up, fps in (over the last `window_s`), frames decoded and
    dropped, reconnects, the last error (credentials removed)."""

    def __init__(self, pipeline: Any, window_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.pipeline, self.window_s, self.clock = pipeline, window_s, clock
        self._seen: dict[str, tuple[float, int, float | None]] = {}  # camera -> (time, decoded, fps: None at first)
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, dict[str, Any]]:
        with self.pipeline.lock:
            running = dict(self.pipeline.workers)
        now, out = self.clock(), {}
        with self._lock:
            for cam, w in running.items():
                src = source_counts(w)
                t, decoded, fps = self._seen.get(cam, (now, src["decoded"], None))
                if now - t >= self.window_s:
                    t, decoded, fps = now, src["decoded"], round((src["decoded"] - decoded) / (now - t), 1)
                self._seen[cam] = (t, decoded, fps)
                out[cam] = {"up": bool(src["up"]), "fps": fps, "frames": src["decoded"],
                            "dropped": sum(src["dropped"].values()), "reconnects": src["reconnects"],
                            "error": redact(src["last_error"] or w.error)}
        return out


class LiveView:
    """The shots and status the page shows, and its HTTP routes (`handle`). Thread-safe: `add` from the publishing
    thread, `handle` from the server's, the status from its own (start() ... close())."""

    def __init__(self, history: int = 20, max_pages: int = 100, token: str | None = None,
                 status: StatusFn | None = None, max_cameras: int = 64, queue_size: int = 64,
                 status_interval_s: float = 1.0, max_shot_bytes: int = 4 << 20):
        """history: shots kept per camera; max_pages: pages connected at once (one more gets 503); token: required of
        every request when set; status: per camera status (PipelineStatus; None: only what the shots say, as for a
        remote agent); max_cameras: cameras kept (the one with the oldest shot goes); queue_size: events a page may
        lag behind before it is cut off; max_shot_bytes: a larger message is not kept (logged)."""
        self.history, self.max_pages, self.token, self.status = history, max_pages, token, status
        self.max_cameras, self.queue_size, self.max_shot_bytes = max_cameras, queue_size, max_shot_bytes
        self.status_interval_s = status_interval_s
        self.cameras: dict[str, deque[_Shot]] = {}
        self.shots: dict[int, _Shot] = {}  # seq -> shot, for the image routes
        self.counts: dict[str, int] = {}  # camera -> shots seen
        self.pages: set[_Page] = set()
        self.seq = 0
        self.served = self.cut_off = self.refused = self.skipped = 0  # pages served, cut off, refused; shots skipped
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- feeding

    def add_shot(self, shot: BestShot) -> None:
        """The agent's own shot, as its subscribers get it (JPEG crops; no embedding)."""
        self.add(decode(encode(shot, include_embedding=False)))

    def add(self, msg: Message) -> None:
        """Keep one shot (never blocks: pages that cannot take it are cut off)."""
        size = len(msg.face_jpeg) + len(msg.context_jpeg)
        if size > self.max_shot_bytes:
            self.skipped += 1
            log.warning("live page: shot of camera %.64r not kept: %d bytes of images", msg.meta["camera"], size)
            return
        extra = msg.meta.get("extra")
        meta = {**msg.meta, "extra": {k: v for k, v in extra.items() if k != "template"}
                if isinstance(extra, dict) else {}}
        with self._lock:
            self.seq += 1
            cam = msg.meta["camera"]
            shot = _Shot(self.seq, cam, {**meta, "seq": self.seq}, msg.face_jpeg, msg.context_jpeg)
            if cam not in self.cameras and len(self.cameras) >= self.max_cameras:
                oldest = min(self.cameras, key=lambda c: self.cameras[c][-1].seq)
                for old in self.cameras.pop(oldest):
                    self.shots.pop(old.seq, None)
                self.counts.pop(oldest, None)
            kept = self.cameras.setdefault(cam, deque())
            kept.append(shot)
            self.shots[shot.seq] = shot
            while len(kept) > self.history:
                self.shots.pop(kept.popleft().seq, None)
            self.counts[cam] = self.counts.get(cam, 0) + 1
            event, pages = _event("shot", shot.meta), list(self.pages)
        for page in pages:
            page.put(event)

    # -- what the page shows

    def _status(self) -> dict[str, dict[str, Any]]:
        status = self.status() if self.status is not None else {}
        with self._lock:
            for cam, kept in self.cameras.items():
                status.setdefault(cam, {}).update(shots=self.counts.get(cam, 0),
                                                  last_shot=kept[-1].meta.get("published_at"))
        return status

    def state(self) -> dict[str, Any]:
        """Every camera's status and kept shots (oldest first)."""
        status = self._status()
        with self._lock:
            shots = {cam: [s.meta for s in kept] for cam, kept in self.cameras.items()}
        return {"history": self.history, "remote": self.status is None, "status": status, "shots": shots}

    # -- the status thread

    def start(self) -> LiveView:
        self._thread = threading.Thread(target=self._beat, name="live-status", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.status_interval_s):
            with self._lock:
                pages = list(self.pages)
            if pages:
                event = _event("status", self._status())
                for page in pages:
                    page.put(event)

    def close(self) -> None:
        """Stop the status thread and end every page's stream."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def collect(self) -> Iterator[Metric]:
        """Prometheus metrics of the page (register the view on the agent's registry)."""
        yield GaugeMetricFamily("bestshot_live_pages", "Live pages connected", value=len(self.pages))
        for name, n, doc in (("served", self.served, "Live pages that connected"),
                             ("cut_off", self.cut_off, "Live pages cut off for falling behind"),
                             ("refused", self.refused, "Live pages refused (max_pages open)")):
            yield CounterMetricFamily(f"bestshot_live_pages_{name}", doc, value=n)

    # -- HTTP

    def handle(self, handler: BaseHTTPRequestHandler, path: str) -> bool:
        """Answer `path` if it is one of the page's routes (True), else leave it to the caller (False)."""
        shot_route = _SHOT_PATH.match(path)
        if path not in _STATIC and path != "/live/events" and shot_route is None:
            return False
        if not self._authorised(handler.headers.get("Authorization", "")):
            _send(handler, 401, "text/plain; charset=utf-8", b"the live page needs its token\n",
                  {"WWW-Authenticate": 'Basic realm="bestshot live", charset="UTF-8"'})
        elif path in _STATIC:
            name, ctype = _STATIC[path]
            _send(handler, 200, ctype, resources.files(__package__).joinpath(name).read_bytes())
        elif shot_route is not None:
            with self._lock:
                shot = self.shots.get(int(shot_route[1]))
            if shot is None:
                _send(handler, 404, "text/plain; charset=utf-8", b"no longer kept\n")
            else:
                _send(handler, 200, "image/jpeg", shot.face if shot_route[2] == "face" else shot.context)
        else:
            self._stream(handler)
        return True

    def _authorised(self, header: str) -> bool:
        if self.token is None:
            return True
        scheme, _, value = header.partition(" ")
        given = value.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _stream(self, handler: BaseHTTPRequestHandler) -> None:
        page = _Page(self.queue_size)
        with self._lock:
            full = len(self.pages) >= self.max_pages
            if full:
                self.refused += 1
            else:
                self.pages.add(page)
                self.served += 1
        if full:
            _send(handler, 503, "text/plain; charset=utf-8", b"too many live pages open\n", {"Retry-After": "5"})
            return
        try:
            handler.send_response(200)
            for k, v in {**_HEADERS, "Content-Type": "text/event-stream", "Connection": "close"}.items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(b"retry: 2000\n\n" + _event("state", self.state()))
            while not self._stop.is_set() and not page.behind:
                try:
                    handler.wfile.write(page.events.get(timeout=self.status_interval_s))
                except queue.Empty:
                    handler.wfile.write(b": keep-alive\n\n")
            if page.behind:
                self.cut_off += 1
                log.info("live page %s fell behind: cut off (it reconnects)", handler.address_string())
        except OSError as e:  # gone, or not reading: the socket timeout ends the write
            log.debug("live page %s: %s", handler.address_string(), e)
        finally:
            with self._lock:
                self.pages.discard(page)
            handler.close_connection = True


def _send(handler: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes,
          headers: dict[str, str] | None = None) -> None:
    handler.send_response(code)
    for k, v in {**_HEADERS, "Content-Type": ctype, "Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)
