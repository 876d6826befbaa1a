"""Receiving best shots: a SUB (or PULL) consumer that writes one JSON line per shot, can save its files and can show
them on the live page (`--view`, agent/service/live.py) as the agent itself does."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import zmq

from agent.common.keys import check_secret_file, load_public_key
from agent.pipeline.outputs.zeromq import TOPIC_PREFIX, Message, decode, is_ipv6
from agent.service.live import LiveView, exposure_problems, read_token
from agent.service.metrics import serve

log = logging.getLogger(__name__)

_POLL_S = 0.2  # poll in slices so Ctrl-C and the idle timeout are noticed promptly


def _stdout_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


MAX_NAME = 64  # characters of a name part taken from the wire (file names stay far below NAME_MAX)


def _safe(value: object) -> str:
    """A name part from the wire (camera, track id, frame index), made safe and bounded as part of a file name:
    anything but ASCII letters, digits, ".", "-" and "_" becomes "_"; longer ones keep their first MAX_NAME
    characters and a hash of the whole, so that two long names stay apart."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(value)).lstrip(".") or "_"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME]}~{hashlib.sha256(str(value).encode()).hexdigest()[:12]}"
    return name


def _write_private(path: Path, blob: bytes) -> None:
    """Faces are biometric data: files 0600 (created so, not chmod-ed after)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)


def meta_path(meta: dict, out_dir: Path) -> Path:
    """Where save() writes a shot's metadata (written last)."""
    return out_dir / _safe(meta["camera"]) / f"{_safe(meta['track_id'])}_{_safe(meta['frame_index'])}.json"


def save(msg: Message, out_dir: Path) -> dict[str, str]:
    """Write <out>/<camera>/<track>_<frame>_{face,context}.jpg, .json and .f32 (if an embedding came); their paths.
    Folders are made 0700, files 0600."""
    meta = meta_path(msg.meta, out_dir)
    d, stem = meta.parent, meta.stem
    for folder in (out_dir, d):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = {"face": (f"{stem}_face.jpg", msg.face_jpeg), "context": (f"{stem}_context.jpg", msg.context_jpeg)}
    if msg.embedding is not None:
        data["embedding"] = (f"{stem}.f32", msg.embedding.astype("<f4").tobytes())
    data["meta"] = (f"{stem}.json", json.dumps(msg.meta, indent=1).encode())  # last: the shot is whole once it is there
    for name, blob in data.values():
        _write_private(d / name, blob)
    return {k: str(d / name) for k, (name, _) in data.items()}


def subscribe(endpoint: str, out_dir: Path | None = None, count: int | None = None, timeout_s: float | None = None,
              topic: str = TOPIC_PREFIX, write_line: Callable[[str], None] = _stdout_line,
              mode: Literal["sub", "pull"] = "sub", context: zmq.Context | None = None,
              server_public_key: Path | None = None, client_secret_key: Path | None = None,
              on_message: Callable[[Message], None] | None = None) -> int:
    """Connect to a publisher and handle shots until `count` arrived, `timeout_s` passed without any message,
    or Ctrl-C. Each shot becomes one JSON line (its metadata, plus "files" when saved under out_dir).
    Corrupt messages are logged and skipped. Returns the number of shots handled.

    CURVE: `server_public_key` (the publisher's .key file) and `client_secret_key` (this client's .key_secret file,
    mode 0600, whose public key the publisher's allow-list holds). A refused client just receives nothing.
    on_message: also given each shot (the live page's LiveView.add)."""
    if mode not in ("sub", "pull"):
        raise ValueError(f"mode {mode!r}: expected 'sub' or 'pull'")
    if (server_public_key is None) != (client_secret_key is None):
        raise ValueError("CURVE needs both server_public_key and client_secret_key")
    curve = None
    if server_public_key is not None:
        curve = (load_public_key(server_public_key), *check_secret_file(client_secret_key))
    sock = (context or zmq.Context.instance()).socket(zmq.SUB if mode == "sub" else zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, is_ipv6(endpoint))
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    if mode == "sub":
        sock.setsockopt_string(zmq.SUBSCRIBE, topic)
    received = 0
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            raise ValueError(f"cannot connect to {endpoint}: {e.strerror}") from e
        log.info("receiving best shots (%s%s) from %s", mode, ", CURVE" if curve else "", endpoint)
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        while count is None or received < count:
            wait = min(_POLL_S, deadline - time.monotonic())
            if wait <= 0:
                log.info("%s: nothing for %.1f s, stopping", endpoint, timeout_s)
                break
            if not sock.poll(math.ceil(wait * 1000)):
                continue
            parts = sock.recv_multipart()
            if timeout_s is not None:
                deadline = time.monotonic() + timeout_s
            try:
                msg = decode(parts)
            except ValueError as e:
                log.error("%s: corrupt message skipped: %s", endpoint, e)
                continue
            if not msg.topic.startswith(topic):  # PULL has no topic filter of its own
                continue
            if on_message is not None:
                on_message(msg)
            line = dict(msg.meta)
            if out_dir is not None:
                try:
                    line["files"] = save(msg, out_dir)
                except (OSError, KeyError, TypeError) as e:  # this shot is not saved; the next ones still are
                    log.error("%s: shot of camera %.80r not saved: %s", endpoint, msg.meta.get("camera"), e)
                    continue
            write_line(json.dumps(line))
            received += 1
    except KeyboardInterrupt:
        log.info("%s: interrupted after %d shot(s)", endpoint, received)
    finally:
        sock.close()
    return received


def serve_view(listen: str, token_env: str | None = None, allow_plaintext: bool = False,
               history: int = 20) -> tuple[LiveView, Callable[[], None]]:
    """The live page for shots received from other agents, on HOST:PORT `listen`: the view to feed and the function
    that stops it. Off loopback it needs a token (from the environment variable `token_env`) and allow_plaintext, as
    the agent's page does. ValueError when it may not listen there or the token is missing; OSError when it cannot."""
    problems = exposure_problems(listen, token_env is not None, allow_plaintext, where="--view")
    if problems:
        raise ValueError("; ".join(problems))
    view = LiveView(history, token=read_token(env=token_env) if token_env else None).start()
    server = serve(listen, None, None, pages=view, max_connections=32 + view.max_pages)  # a page holds one

    def stop() -> None:
        view.close()
        server.shutdown()
        server.server_close()

    log.info("live page of the received shots: http://%s:%d/", *server.server_address[:2])
    return view, stop
