"""Real message servers for the output tests, on 127.0.0.1 and free ports: NATS (one node or a 3-node JetStream
cluster) and mosquitto, from Debian's packages (tests/setup_system.sh); and best shots cut from a real photo."""

from __future__ import annotations

import asyncio
import getpass
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import cv2
import nats
import numpy as np
import pytest
from ports import free_port

from agent.types import BestShot

HERE = Path(__file__).resolve().parent
PHOTO = HERE.parents[2] / "shared" / "data" / "images" / "face_recognition" / "obama-1080p.jpg"


def binary(name: str) -> str:
    """The server's path (Debian installs them in /usr/sbin, often not on a user's PATH)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.skip(f"{name} is not installed: run tests/setup_system.sh as root")
    return path


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = 30.0, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(every_s)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """One server process; kill() (SIGKILL) or stop() (SIGTERM) and start() again keep its port and data."""

    def __init__(self, args: list[str], port: int, log: Path) -> None:
        self.args, self.port, self.log = args, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        wait_until(f"{self.args[0]} listening on {self.port}",
                   lambda: _accepts(self.port) or self.proc.poll() is not None)
        assert self.proc.poll() is None, f"{self.args[0]} exited: {self.log.read_text()[-2000:]}"
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class NatsNode(Server):
    def __init__(self, folder: Path, name: str = "n1", port: int | None = None, cluster_port: int | None = None,
                 routes: list[int] = (), extra: str = "") -> None:
        port = port or free_port()
        self.name, self.url = name, f"nats://127.0.0.1:{port}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = [f"server_name: {name}", f"listen: 127.0.0.1:{port}",
                f'jetstream {{ store_dir: "{folder / "js"}", max_file_store: 1G, max_memory_store: 64M }}', extra]
        if cluster_port is not None:
            conf.append(f"cluster {{ name: bestshot-test, listen: 127.0.0.1:{cluster_port}, routes: ["
                        + ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes) + "] }")
        (folder / "nats.conf").write_text("\n".join(conf) + "\n")
        super().__init__([binary("nats-server"), "-c", str(folder / "nats.conf")], port, folder / "nats.log")


class NatsCluster:
    """Three JetStream nodes routed to each other."""

    def __init__(self, folder: Path) -> None:
        ports = [free_port() for _ in range(3)]
        cports = [free_port() for _ in range(3)]
        self.nodes = [NatsNode(folder / f"n{i}", f"n{i}", ports[i], cports[i], [p for p in cports if p != cports[i]])
                      for i in range(3)]
        self.urls = [n.url for n in self.nodes]

    def start(self) -> NatsCluster:
        for n in self.nodes:
            n.start()
        wait_until("a JetStream meta leader", lambda: run(_js_ready(self.urls)), timeout_s=60, every_s=0.3)
        return self

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


def run(coro):  # any coroutine
    return asyncio.run(coro)


async def _quiet(_e: Exception) -> None:
    """nats-py prints every connection error with its traceback unless given an error callback."""


async def connect(urls: list[str]) -> nats.NATS:
    return await nats.connect(servers=urls, connect_timeout=1, allow_reconnect=False, error_cb=_quiet)


async def _js_ready(urls: list[str]) -> bool:
    try:
        nc = await connect(urls)
    except Exception:
        return False
    try:
        await nc.jetstream().account_info()
        return True
    except Exception:
        return False
    finally:
        await nc.close()


async def stream_state(urls: list[str], stream: str = "BESTSHOT") -> tuple[str | None, bool, int]:
    """(leader's server name, every replica current, messages stored) of the stream."""
    nc = await connect(urls)
    try:
        info = await nc.jetstream(timeout=2).stream_info(stream)
        c = info.cluster
        current = c is not None and c.leader is not None and all(r.current for r in c.replicas or [])
        return (None if c is None else c.leader), current and len(c.replicas or []) == 2, info.state.messages
    finally:
        await nc.close()


async def stream_ids(urls: list[str], stream: str = "BESTSHOT") -> list[str]:
    """The Nats-Msg-Id of every message in the stream, by sequence."""
    nc = await connect(urls)
    try:
        js = nc.jetstream(timeout=5)
        n = (await js.stream_info(stream)).state.last_seq
        return [(await js.get_msg(stream, seq)).headers["Nats-Msg-Id"] for seq in range(1, n + 1)]
    finally:
        await nc.close()


class Mosquitto(Server):
    def __init__(self, folder: Path, extra: str = "") -> None:
        port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mosquitto.conf").write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {folder}/\n"
            f"user {getpass.getuser()}\n{extra}\n")  # as root it would switch to `mosquitto`, who cannot write here
        super().__init__([binary("mosquitto"), "-c", str(folder / "mosquitto.conf")], port,
                         folder / "mosquitto.log")


_PHOTO: np.ndarray | None = None


def real_shot(track_id: int, camera: str = "door-1", status: str = "best", frame_index: int = 0) -> BestShot:
    """A best shot cut from a real photo (a 1080p portrait): the face region as the aligned crop (112x112) and a
    wider region as context, shifted a little per track so that every shot's images differ."""
    global _PHOTO
    if _PHOTO is None:
        if not PHOTO.is_file():
            pytest.skip(f"no shared data photo at {PHOTO}")
        _PHOTO = cv2.imread(str(PHOTO))
    h, w = _PHOTO.shape[:2]
    dx = (track_id * 7) % 40
    face = cv2.resize(_PHOTO[h // 6 + dx:h // 6 + dx + 360, w // 2 - 200 + dx:w // 2 + 160 + dx], (112, 112))
    context = cv2.resize(_PHOTO[dx:h // 2 + dx, w // 4 + dx:3 * w // 4 + dx], (320, 240))
    emb = np.random.default_rng(track_id).standard_normal(512).astype(np.float32)
    return BestShot(camera=camera, track_id=track_id, status=status, first_seen=1.0, best_time=1.5, last_seen=2.0,
                    frame_index=frame_index, bbox=np.array([100, 80, 260, 300], np.float32),
                    landmarks=np.array([[150, 150], [210, 150], [180, 190], [155, 240], [205, 240]], np.float32),
                    det_score=0.95, quality=0.8, drift=0.4, prefiqs=0.8, frames_seen=30, frames_scored=10,
                    model_id="facenet-2:4", crop=face, context=context, embedding=emb / np.linalg.norm(emb),
                    extra={})


def update_of(shot: BestShot) -> BestShot:
    return replace(shot, status="update")
