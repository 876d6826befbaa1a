"""The agent as a process, what the README promises of it: exit 2 on a bad configuration, the publisher as the YAML
describes it (push, CURVE, spool across a restart, no embedding), SIGHUP restarting a changed camera and re-reading
the CURVE allow-list, sd_notify READY / WATCHDOG / RELOADING / STOPPING, and `bestshot run` with no arguments.

Real parts only: `python -m agent.cli run` as a child process, real ZeroMQ sockets on 127.0.0.1, real shared clips and
the prepared models. Every wait is a polled condition with a generous ceiling; every child is killed in a finally.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
import zmq
from ports import free_port
from test_notify import Systemd

from agent.common.keys import check_secret_file, generate_keys, load_public_key
from agent.pipeline.outputs.spool import unpack
from agent.pipeline.outputs.zeromq import decode

pytestmark = pytest.mark.timeout(300)

SELFIE = "data/video/inspireface_810_1684206192.mp4"  # one face throughout, 345 frames
POLL_S = 0.3
SHOT_LINE = re.compile(r"camera (\S+) track (\d+): (\w+) shot, frame (\d+), quality ([0-9.]+)")
CLOSED = re.compile(r"closed: (\d+) published \(\d+ bytes\), (\d+) dropped, (\d+) spooled, (\d+) still in the spool")


def until(cond: Callable[[], object], timeout: float, what: str, alive: Callable[[], None] | None = None) -> None:
    """Poll `cond` every POLL_S until it holds; AssertionError naming `what` after `timeout` (or when `alive` says
    the agent died)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def looping_config(clip: Path, endpoint: str, cameras: tuple[str, ...] = ("a",), updates: bool = False,
                   **publisher: object) -> dict:
    """Cameras replaying `clip` at 10 fps of pts; with `updates`, an "update" shot per open track every pts second,
    so that shots keep coming while the agent runs."""
    selection = {"update_every_s": 1.0} if updates else {}
    return {"defaults": {"source": {"loop": True, "max_fps": 10}, "selection": selection},
            "cameras": [{"id": c, "url": str(clip)} for c in cameras],
            "scoring": {"budget": 20},
            "publisher": {"endpoint": endpoint, **publisher},
            "metrics": {"listen": None}}


class AgentRun:
    """`python -m agent.cli run [args]` as a child process, its stderr in a log file. A context manager that kills
    the child on the way out whatever happened."""

    def __init__(self, log: Path, args: list[str], env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        self.log = log
        with open(log, "a") as err:
            self.proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "agent.cli", "run", *args],
                                         stderr=err, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})

    @classmethod
    def with_config(cls, tmp: Path, cfg: dict, name: str = "bestshot", trace: bool = False, **kw: object) -> AgentRun:
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args = ["--config", str(path)] + (["--trace", str(tmp / f"{name}.jsonl")] if trace else [])
        return cls(tmp / f"{name}.log", args, **kw)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the agent exited ({self.proc.returncode}): {self.text()[-3000:]}")

    def wait(self, cond: Callable[[], object], timeout: float, what: str) -> None:
        until(cond, timeout, what, self.alive)

    def wait_log(self, needle: str, timeout: float = 60) -> None:
        self.wait(lambda: needle in self.text(), timeout, repr(needle))

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM; the exit status (a timeout fails the test)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> AgentRun:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class Consumer:
    """A real SUB or PULL socket (a CURVE client when given the server's public key and a client key pair) on its own
    thread, keeping every multipart message it receives."""

    def __init__(self, endpoint: str, kind: int = zmq.SUB, curve: tuple[Path, Path] | None = None) -> None:
        self.endpoint, self.kind, self.curve = endpoint, kind, curve
        self.msgs: list[list[bytes]] = []
        self._stop, self._connected = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._connected.wait(10), "consumer socket did not start"

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(self.kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            server_public, client_secret = self.curve
            sock.curve_serverkey = load_public_key(server_public)
            sock.curve_publickey, sock.curve_secretkey = check_secret_file(client_secret)
        if self.kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"bestshot.")
        sock.connect(self.endpoint)
        self._connected.set()
        try:
            while not self._stop.is_set():
                if sock.poll(100):
                    self.msgs.append(sock.recv_multipart())
        finally:
            sock.close()

    def metas(self) -> list[dict]:
        return [json.loads(m[1]) for m in list(self.msgs)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Keys:
    server: tuple[Path, Path]  # (public .key, .key_secret)
    allowed_dir: Path  # the publisher's allow-list folder: holds a's public key only, at first
    a: tuple[Path, Path]
    b: tuple[Path, Path]

    def client(self, who: tuple[Path, Path]) -> tuple[Path, Path]:
        """What a Consumer needs to be that client: (the server's public key, the client's secret key)."""
        return self.server[0], who[1]

    def curve_section(self) -> dict:
        return {"server_secret_key": str(self.server[1]), "authorized_keys_dir": str(self.allowed_dir)}


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    server = generate_keys(tmp_path / "server", "bestshot")
    a, b = generate_keys(tmp_path / "clients", "a"), generate_keys(tmp_path / "clients", "b")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(a[0], allowed)
    return Keys(server, allowed, a, b)


def shot_lines(text: str) -> list[tuple[str, int, str, int, float]]:
    """Every "camera C track T: S shot, frame F, quality Q" line of an agent log."""
    return [(c, int(t), s, int(f), float(q)) for c, t, s, f, q in SHOT_LINE.findall(text)]


# 1. exit status 2 on a configuration error (the unit's RestartPreventExitStatus=2)

BAD_CONFIGS = {
    "yaml syntax": ("cameras:\n  - {id: a, url: clip.mp4\n", ["invalid YAML", "line 3"]),
    "unknown key": ("cameras: [{id: a, url: clip.mp4}]\npublisher: {endpont: 'tcp://127.0.0.1:5556'}\n",
                    ["publisher.endpont: unknown key"]),
    "missing file": (None, ["cannot read: No such file or directory"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_invalid_config_exits_2_naming_the_cause_before_loading_models(case: str, tmp_path: Path) -> None:
    text, causes = BAD_CONFIGS[case]
    path = tmp_path / "bestshot.yaml"
    if text is not None:
        path.write_text(text)
    cache = tmp_path / "cache"  # an empty model cache: preparing any model would fill it
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(path)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "BESTSHOT_CACHE": str(cache)})
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert errors and all(str(path) in line for line in errors), r.stderr[-3000:]
    for cause in causes:
        assert cause in r.stderr, r.stderr[-3000:]
    assert not cache.exists(), "models were prepared before the configuration was validated"
    assert "Traceback" not in r.stderr


def test_readable_secret_key_exits_2(keys: Keys, shared_dir: Path, tmp_path: Path) -> None:
    """A valid file whose CURVE secret key others can read: refused, as a configuration error (no restart loop)."""
    keys.server[1].chmod(0o644)
    cfg = looping_config(shared_dir / SELFIE, f"tcp://127.0.0.1:{free_port()}", curve=keys.curve_section())
    with AgentRun.with_config(tmp_path, cfg) as agent:
        assert agent.proc.wait(120) == 2, agent.text()[-3000:]
    assert f"{keys.server[1]}: the secret key file is accessible by group or others" in agent.text()
    assert "Traceback" not in agent.text()


# 2. publisher: {mode: push, curve, spool, include_embedding: false} from the YAML, through two agent runs

def test_push_curve_spool_without_embedding_across_a_restart(keys: Keys, shared_dir: Path, tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    spool = tmp_path / "spool"
    cfg = looping_config(shared_dir / SELFIE, endpoint, updates=True, mode="push", include_embedding=False,
                         curve=keys.curve_section(), spool={"dir": str(spool), "max_mb": 64})
    # run 1: only consumers the CURVE server refuses (an unknown key, plain text): every shot goes to the spool
    stranger = Consumer(endpoint, zmq.PULL, keys.client(keys.b))
    plain = Consumer(endpoint, zmq.PULL)
    try:
        with AgentRun.with_config(tmp_path, cfg) as run1:

            def spooled() -> bool:  # fails at once when a shot reaches a refused consumer or is dropped
                assert stranger.msgs == [] and plain.msgs == [], "a consumer the CURVE server refuses got shots"
                assert "[dropped]" not in run1.text(), "shots dropped instead of spooled"
                return len(list(spool.glob("*.msg"))) >= 3

            run1.wait(spooled, 120, "3 shots in the spool")
            assert run1.terminate() == 0, run1.text()[-3000:]
        log1 = run1.text()
        files = sorted(spool.glob("*.msg"))
        shots = shot_lines(log1)
        assert len(files) == len(shots) >= 4  # the updates, then the open track's best shot flushed at SIGTERM
        assert "[dropped]" not in log1
        closed = tuple(map(int, CLOSED.search(log1).groups()))  # published, dropped, spooled, still in the spool
        assert closed == (0, 0, len(files), len(files))
        kept = [unpack(f.read_bytes()) for f in files]
        for parts in kept:
            msg = decode(parts)
            assert len(parts) == 4 and msg.embedding is None and "embedding_dim" not in msg.meta
        assert [(m.meta["track_id"], m.meta["status"], m.meta["frame_index"]) for m in map(decode, kept)] == \
            [(t, s, f) for _, t, s, f, _ in shots]  # the spool holds the logged shots, in order

        # run 2, same file: an allowed consumer gets every spooled shot first, in order, once, then the new ones
        allowed = Consumer(endpoint, zmq.PULL, keys.client(keys.a))
        try:
            with AgentRun.with_config(tmp_path, cfg) as run2:
                run2.wait(lambda: len(allowed.msgs) >= len(kept) + 2, 120, "the spooled shots and two new ones")
                assert run2.terminate() == 0, run2.text()[-3000:]
        finally:
            allowed.close()
        got = list(allowed.msgs)
        assert got[:len(kept)] == kept
        assert all(got.count(parts) == 1 for parts in kept)
        assert all(len(p) == 4 and decode(p).embedding is None for p in got)
        log2 = run2.text()[len(log1):]
        assert f"spool {spool}: {len(kept)} message(s)" in log2 and "spool drained" in log2
        assert not any(f.exists() for f in files)
        assert stranger.msgs == [] and plain.msgs == []
    finally:
        stranger.close()
        plain.close()


# 3. SIGHUP with one camera's settings changed: that camera restarts, the other is not disturbed

def test_sighup_restarts_a_changed_camera_only(shared_dir: Path, tmp_path: Path) -> None:
    cfg = looping_config(shared_dir / SELFIE, "ipc://" + str(tmp_path / "pub.sock"), cameras=("a", "b"))
    trace = tmp_path / "bestshot.jsonl"

    def scored() -> list[dict]:  # complete lines only: the trace is written in buffered chunks
        lines = trace.read_text().split("\n")[:-1] if trace.exists() else []
        return [r for r in map(json.loads, lines) if r["event"] == "scored"]

    with AgentRun.with_config(tmp_path, cfg, trace=True) as agent:
        agent.wait(lambda: {"a", "b"} <= {r["camera"] for r in scored()}, 120, "both cameras scoring")
        cfg["cameras"][1]["source"] = {"max_fps": 8}
        (tmp_path / "bestshot.yaml").write_text(yaml.safe_dump(cfg))
        agent.proc.send_signal(signal.SIGHUP)
        reloaded = f"reloaded {tmp_path / 'bestshot.yaml'}: "
        agent.wait_log(reloaded)
        assert f"{reloaded}0 cameras added, 0 removed, 1 restarted, 1 untouched" in agent.text()
        agent.wait_log("camera b: ended after")  # the old b worker stopped, its open tracks flushed
        text = agent.text()
        old = [t for c, t, s, _, _ in shot_lines(text[:text.index("camera b: ended after")]) if c == "b"]
        assert old, "the old b worker's open track was not flushed"
        # b scores again on a new worker: a new tracker, whose track ids follow every id the old one used
        agent.wait(lambda: any(r["camera"] == "b" and r["track_id"] > max(old) for r in scored()), 90,
                   "camera b scoring a new track after its restart")
        assert "camera a: ended after" not in agent.text()  # a untouched
        assert agent.terminate() == 0, agent.text()[-3000:]


# 4. SIGHUP re-reads the CURVE allow-list: a key added is admitted, a key removed is cut off

def test_sighup_rereads_the_curve_allow_list(keys: Keys, shared_dir: Path, tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = looping_config(shared_dir / SELFIE, endpoint, updates=True, curve=keys.curve_section())
    a = Consumer(endpoint, zmq.SUB, keys.client(keys.a))
    refused = Consumer(endpoint, zmq.SUB, keys.client(keys.b))
    b: Consumer | None = None
    try:
        with AgentRun.with_config(tmp_path, cfg) as agent:
            agent.wait(lambda: len(a.msgs) >= 2, 120, "two shots at the allowed client a")
            assert refused.msgs == []  # b, connected as long as a, got none of them
            shutil.copy(keys.b[0], keys.allowed_dir)
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait_log("reload: 2 authorized subscriber keys")
            # a client the server refused does not retry by itself (libzmq): b connects again
            b = Consumer(endpoint, zmq.SUB, keys.client(keys.b))
            agent.wait(lambda: len(b.msgs) >= 2, 60, "two shots at b once its key is allowed")

            (keys.allowed_dir / keys.a[0].name).unlink()
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait_log("connections dropped after a key was revoked")
            cut = time.time()  # every shot published after this went out after a's connection was dropped

            def after_cut(c: Consumer) -> list[tuple]:
                return [(m["track_id"], m["frame_index"], m["published_at"]) for m in c.metas()
                        if m["published_at"] > cut]

            agent.wait(lambda: len(after_cut(b)) >= 3, 60, "b (still allowed) reconnected and receiving")
            assert after_cut(a) == [], "the revoked client a still receives shots"
            assert not set(after_cut(b)[:2]) & {(m["track_id"], m["frame_index"], m["published_at"])
                                                for m in a.metas()}
            assert agent.terminate() == 0, agent.text()[-3000:]
        assert "reload: 1 authorized subscriber keys" in agent.text()
    finally:
        for c in (a, refused, b):
            if c is not None:
                c.close()


# 5. sd_notify from the real process: READY once bound, guarded WATCHDOG pings, RELOADING/READY, STOPPING

def test_ready_watchdog_reloading_stopping(shared_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    cfg = looping_config(shared_dir / SELFIE, f"tcp://127.0.0.1:{port}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        systemd = Systemd(sock)
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}
        # systemd sets WATCHDOG_PID to the main process: the pid the agent will have (sh execs it)
        prefix = ["sh", "-c", 'export WATCHDOG_PID=$$; exec "$0" "$@"']
        with AgentRun.with_config(tmp_path, cfg, env=env, prefix=prefix) as agent:

            def expect(key: str, timeout: float = 120) -> tuple[dict[str, str], list[dict[str, str]]]:
                """The next message carrying `key`, and those before it."""
                before, deadline = [], time.monotonic() + timeout
                while True:
                    try:
                        msg = systemd.recv(POLL_S)
                    except TimeoutError:  # nothing queued: only now may an exit or the deadline end the wait
                        agent.alive()
                        assert time.monotonic() < deadline, f"no {key} within {timeout} s; got {before}"
                        continue
                    if key in msg:
                        return msg, before
                    before.append(msg)

            ready, _ = expect("READY")
            assert ready["READY"] == "1" and ready["STATUS"] == f"1 camera(s), publishing on tcp://127.0.0.1:{port}"
            socket.create_connection(("127.0.0.1", port), timeout=5).close()  # the publisher is bound already
            for _ in range(3):  # pings every WATCHDOG_USEC / 2 while the pipeline lives
                ping, others = expect("WATCHDOG", 60)
                assert ping == {"WATCHDOG": "1"} and others == []
            agent.proc.send_signal(signal.SIGHUP)
            reloading, _ = expect("RELOADING", 60)
            assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
            ready, _ = expect("READY", 60)
            assert ready["READY"] == "1"
            agent.proc.send_signal(signal.SIGTERM)
            stopping, _ = expect("STOPPING", 60)
            assert stopping == {"STOPPING": "1"}
            assert agent.proc.wait(60) == 0, agent.text()[-3000:]
        assert "systemd watchdog: pinging every 1.0 s" in agent.text()


# 6. `bestshot run` with no arguments: the embedded demo, to a subscriber on the default endpoint

def test_run_without_arguments_publishes_the_demo_shots(tmp_path: Path) -> None:
    for port in (5556, 9108):  # the defaults: publisher.endpoint and metrics.listen
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"127.0.0.1:{port}, a default of `bestshot run`, is in use by another process")
    sub = Consumer("tcp://127.0.0.1:5556", zmq.SUB)
    try:
        with AgentRun(tmp_path / "demo.log", []) as agent:
            rc = agent.proc.wait(280)
        text = agent.text()
        if rc and "Address already in use" in text:  # another process took a default port meanwhile
            pytest.skip("a default port of `bestshot run` was taken by another process during the run")
        assert rc == 0, text[-3000:]
        shots = shot_lines(text)
        published = int(re.search(r"done: .* (\d+) shots published \(0 dropped\)", text)[1])
        assert len(shots) == published >= 1
        until(lambda: len(sub.msgs) >= published, 30, f"{published} shots at the subscriber")
    finally:
        sub.close()
    msgs = [decode(p) for p in sub.msgs]
    assert len(msgs) == published
    logged = {(t, f): q for c, t, _, f, q in shots if c == "demo"}
    assert {(m.meta["track_id"], m.meta["frame_index"]) for m in msgs} == set(logged)
    for m in msgs:
        assert m.topic == "bestshot.demo" and m.meta["status"] == "best"
        assert round(m.meta["quality"], 3) == pytest.approx(logged[m.meta["track_id"], m.meta["frame_index"]])
        face = cv2.imdecode(np.frombuffer(m.face_jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert face is not None and face.shape == (160, 160, 3)
        assert m.embedding is not None and m.embedding.shape == (512,)
