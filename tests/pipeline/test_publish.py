"""The best-shot wire format and its transport over real ZeroMQ sockets (tcp on 127.0.0.1 and ipc)."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
from ports import free_port

from agent.cli.subscribe import subscribe
from agent.pipeline.outputs.exposure import in_clear, is_local
from agent.pipeline.outputs.zeromq import SCHEMA_VERSION, BindError, Publisher, PublisherConfig, decode, encode
from agent.types import BestShot

pytestmark = pytest.mark.timeout(60)
CTX = zmq.Context.instance()


def make_shot(track_id: int = 7, camera: str = "door-1", frame_index: int = 42, dim: int = 512) -> BestShot:
    rng = np.random.default_rng(abs(track_id))
    crop = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), (5, 5), 0)
    context = cv2.GaussianBlur(rng.integers(0, 256, (180, 150, 3), dtype=np.uint8), (5, 5), 0)
    emb = rng.standard_normal(dim).astype(np.float32)
    return BestShot(
        camera=camera, track_id=track_id, status="best", first_seen=1.5, best_time=2.25, last_seen=4.0,
        frame_index=frame_index, bbox=np.array([10.5, 20.25, 90.0, 130.0], np.float32),
        landmarks=np.array([[30, 50], [70, 50], [50, 75], [35, 95], [65, 95]], np.float32),
        det_score=0.93, quality=0.81, drift=0.38, prefiqs=0.81, frames_seen=60,
        frames_scored=12, model_id="facenet-2:4",
        crop=crop, context=context, embedding=emb / np.linalg.norm(emb),
        extra={"topk": np.array([0.81, 0.79]), "ers": np.float32(0.5), "note": "x"},
    )


@pytest.fixture
def ipc_endpoint() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="bs", dir="/tmp")  # ipc paths must stay under ~107 characters
    yield f"ipc://{d}/shots.sock"
    shutil.rmtree(d, ignore_errors=True)


def test_round_trip() -> None:
    shot = make_shot()
    parts = encode(shot, include_embedding=True, jpeg_quality=85)
    assert len(parts) == 5 and parts[0] == b"bestshot.door-1"
    msg = decode(parts)
    m = msg.meta
    assert msg.topic == "bestshot.door-1"
    assert m["schema"] == SCHEMA_VERSION and m["camera"] == "door-1" and m["track_id"] == 7 and m["status"] == "best"
    assert m["timestamps"] == {"first_seen": 1.5, "best": 2.25, "last_seen": 4.0}
    assert abs(m["published_at"] - time.time()) < 5
    assert m["frame_index"] == 42 and m["bbox"] == [10.5, 20.25, 90.0, 130.0]
    assert m["landmarks"] == [[30, 50], [70, 50], [50, 75], [35, 95], [65, 95]]
    assert (m["quality"], m["drift"], m["det_score"]) == (0.81, 0.38, 0.93)
    assert (m["frames_seen"], m["frames_scored"], m["model_id"]) == (60, 12, "facenet-2:4")
    assert m["agent_version"] == version("bestshot-agent")  # the installed build that sent it
    assert m["embedding_dim"] == 512 and m["embedding_dtype"] == "float32-le"
    assert m["face_size"] == [112, 112] and m["context_size"] == [150, 180]
    assert m["extra"] == {"topk": [0.81, 0.79], "ers": 0.5, "note": "x"}
    face = cv2.imdecode(np.frombuffer(msg.face_jpeg, np.uint8), cv2.IMREAD_COLOR)
    context = cv2.imdecode(np.frombuffer(msg.context_jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert face.shape == shot.crop.shape and context.shape == shot.context.shape
    assert np.abs(face.astype(int) - shot.crop).mean() < 8  # lossy but close
    assert parts[4] == shot.embedding.astype("<f4").tobytes()
    assert msg.embedding.dtype == np.float32 and np.array_equal(msg.embedding, shot.embedding)


LOCAL = ["tcp://127.0.0.1:5556", "tcp://127.0.0.1:*", "tcp://127.8.9.10:5556", "tcp://localhost:5556",
         "tcp://LocalHost:5556", "tcp://[::1]:5556", "tcp://[::ffff:127.0.0.1]:5556", "ipc:///run/bestshot/shots.sock",
         "inproc://shots", "nats://user:pw@127.0.0.1:4222"]
REACHABLE = ["tcp://0.0.0.0:5556", "tcp://*:5556", "tcp://[::]:5556", "tcp://192.168.1.20:5556", "tcp://10.0.0.5:*",
             "tcp://[fe80::1]:5556", "tcp://[::ffff:10.0.0.1]:5556", "tcp://edge-box.lan:5556", "tcp://eth0:5556",
             "tcp://:5556", "nats://user:pw@broker:4222"]


@pytest.mark.parametrize("address", LOCAL + REACHABLE)
def test_which_addresses_keep_faces_on_the_machine(address: str) -> None:
    """Loopback, localhost, ipc:// and inproc:// stay here; every interface, a LAN address, a host or interface name
    (never resolved) can be reached from elsewhere: there, only encryption keeps the faces out of clear text."""
    local = address in LOCAL
    assert is_local(address) is local
    assert in_clear(address, encrypted=False) is not local
    assert not in_clear(address, encrypted=True)


def test_without_embedding_or_landmarks() -> None:
    shot = make_shot()
    shot.landmarks = None
    parts = encode(shot, include_embedding=False)
    msg = decode(parts)
    assert len(parts) == 4 and msg.embedding is None and msg.meta["landmarks"] is None
    assert "embedding_dim" not in msg.meta and "embedding_dtype" not in msg.meta


@pytest.mark.parametrize("mangle, match", [
    (lambda p: p[:3], "expected 4 or 5 message parts, got 3"),
    (lambda p: [*p, b"x"], "expected 4 or 5 message parts, got 6"),
    (lambda p: [p[0], p[1].replace(b'"schema":1', b'"schema":2'), *p[2:]], "schema version 2"),
    (lambda p: [p[0], b"{not json", *p[2:]], "unreadable topic or metadata"),
    (lambda p: [p[0], b"[1]", *p[2:]], "not an object"),
    (lambda p: [b"bestshot.other", *p[1:]], "does not match camera"),
    (lambda p: [*p[:4], p[4][:-4]], "does not match embedding_dim 512"),
    (lambda p: p[:4], "announces a 512-d embedding"),
    (lambda p: [p[0], p[1].replace(b'"track_id":7', b'"track_id":"7"'), *p[2:]], "mistypes track_id"),
])
def test_decode_rejects_bad_messages(mangle, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode(mangle(encode(make_shot(), include_embedding=True)))


def wait_first(pub: Publisher, sub: zmq.Socket) -> None:
    """Slow joiner: a SUB misses what is published before its subscription reaches the PUB; probe until one lands."""
    deadline = time.monotonic() + 10
    probe = make_shot(track_id=-1)
    while not sub.poll(20):
        assert time.monotonic() < deadline, "subscriber never joined"
        pub.publish(probe)
    while sub.poll(200):  # drain the probes still in flight
        sub.recv_multipart()


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_pub_sub_delivers(transport: str, ipc_endpoint: str) -> None:
    endpoint = "tcp://127.0.0.1:*" if transport == "tcp" else ipc_endpoint
    with Publisher(PublisherConfig(endpoint=endpoint)) as pub:
        sub = CTX.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"bestshot.door-1")
        sub.connect(pub.endpoint)
        try:
            wait_first(pub, sub)
            before = pub.published
            n = 20
            assert all(pub.publish(make_shot(track_id=i)) for i in range(n))
            pub.publish(make_shot(camera="yard"))  # filtered out by the subscription
            got = [decode(sub.recv_multipart()) for _ in range(n)]
            assert not sub.poll(200)
        finally:
            sub.close(linger=0)
    assert [m.meta["track_id"] for m in got] == list(range(n))
    assert all(np.array_equal(m.embedding, make_shot(track_id=i).embedding) for i, m in enumerate(got))
    assert pub.published == before + n + 1 and pub.dropped == 0 and pub.bytes > 0


def run_subscriber(**kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {"lines": []}

    def target() -> None:
        result["n"] = subscribe(write_line=result["lines"].append, **kwargs)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


@pytest.mark.parametrize("mode", ["sub", "pull"])
def test_subscribe_writes_files(mode: str, tmp_path: Path) -> None:
    n = 5
    with Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", mode="pub" if mode == "sub" else "push")) as pub:
        t, result = run_subscriber(endpoint=pub.endpoint, out_dir=tmp_path, count=n, timeout_s=10, mode=mode)
        i = 0
        while t.is_alive() and i < 2000:  # until the subscriber has joined and taken n (slow joiner / no peer yet)
            if pub.publish(make_shot(track_id=i, frame_index=100 + i)):
                i += 1
            time.sleep(0.005)
        t.join(5)
    assert not t.is_alive() and result["n"] == n and len(result["lines"]) == n
    for line in result["lines"]:
        meta = json.loads(line)
        files = meta.pop("files")
        assert set(files) == {"face", "context", "meta", "embedding"}
        stem = f"{meta['track_id']}_{meta['frame_index']}"
        assert files["face"] == str(tmp_path / "door-1" / f"{stem}_face.jpg")
        assert cv2.imread(files["face"]).shape == (112, 112, 3)
        assert cv2.imread(files["context"]).shape == (180, 150, 3)
        assert json.loads(Path(files["meta"]).read_text()) == meta
        emb = np.fromfile(files["embedding"], "<f4")
        assert np.array_equal(emb, make_shot(track_id=meta["track_id"]).embedding)
    if mode == "pull":  # PUSH queues for a connected PULL: nothing lost, in order
        assert [json.loads(s)["track_id"] for s in result["lines"]] == list(range(n))


def test_ipv6_loopback_from_the_config_to_the_subscriber(tmp_path: Path) -> None:
    """tcp://[::1]:PORT passes the config (loopback: no encryption needed), binds and reaches `bestshot subscribe`."""
    from agent.service.config import parse_config

    cfg = parse_config({"cameras": [{"id": "a", "url": "clip.mp4"}], "publisher": {"endpoint": "tcp://[::1]:5556",
                                                                                  "mode": "push"}})
    assert cfg.publisher.endpoint == "tcp://[::1]:5556"
    with Publisher(PublisherConfig(endpoint="tcp://[::1]:*", mode="push")) as pub:
        assert pub.endpoint.startswith("tcp://[::1]:")
        t, result = run_subscriber(endpoint=pub.endpoint, out_dir=tmp_path, count=3, timeout_s=10, mode="pull")
        i = 0
        while t.is_alive() and i < 2000:  # PUSH takes a shot only once the subscriber has connected
            if pub.publish(make_shot(track_id=i)):
                i += 1
            time.sleep(0.005)
        t.join(10)
    assert not t.is_alive() and result["n"] == 3
    assert [json.loads(line)["track_id"] for line in result["lines"]] == [0, 1, 2]


def test_subscribe_times_out_when_nothing_comes() -> None:
    t0 = time.monotonic()
    lines: list[str] = []
    assert subscribe(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.5, write_line=lines.append) == 0
    assert 0.45 <= time.monotonic() - t0 < 10 and lines == []  # gave up after its idle limit, did not hang


def test_subscribe_skips_corrupt_messages(caplog: pytest.LogCaptureFixture, ipc_endpoint: str) -> None:
    push = CTX.socket(zmq.PUSH)
    push.bind(ipc_endpoint)
    try:
        t, result = run_subscriber(endpoint=ipc_endpoint, count=1, timeout_s=10, mode="pull")
        with caplog.at_level(logging.ERROR, logger="agent.cli.subscribe"):
            push.send_multipart([b"bestshot.x", b"garbage"])  # blocks until the PULL connects
            push.send_multipart(encode(make_shot(), include_embedding=False))
            t.join(10)
    finally:
        push.close(linger=0)
    assert result["n"] == 1 and json.loads(result["lines"][0])["track_id"] == 7
    assert "corrupt message skipped: expected 4 or 5 message parts, got 2" in caplog.text


def test_publish_never_blocks_without_consumer(caplog: pytest.LogCaptureFixture) -> None:
    shot = make_shot()
    with caplog.at_level(logging.WARNING, logger="agent.pipeline.outputs.zeromq"):
        with Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", mode="push", linger_ms=0)) as pub:
            t0 = time.monotonic()
            results = [pub.publish(shot) for _ in range(1000)]
            elapsed = time.monotonic() - t0
    # each send returns at once (a blocking one would hang, one with a send timeout take 1000 x it): a ceiling with
    # room for a loaded machine, three orders of magnitude above the ~5 ms this takes
    assert elapsed < 10 and not any(results)
    assert (pub.published, pub.dropped, pub.bytes) == (0, 1000, 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 best shot(s) dropped" in warnings[0].getMessage()  # rate-limited


def test_publish_never_blocks_with_stalled_consumer() -> None:
    shot = make_shot()
    shot.crop, shot.context = shot.crop[:40, :40], shot.context[:60, :50]
    with Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", mode="push", sndhwm=1, linger_ms=0)) as pub:
        pull = CTX.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 1)
        pull.connect(pub.endpoint)
        try:
            deadline = time.monotonic() + 10
            while not pub.publish(shot):  # wait for the connection
                assert time.monotonic() < deadline
            dropped0, t0 = pub.dropped, time.monotonic()
            results = [pub.publish(shot) for _ in range(1000)]  # the PULL never reads
            elapsed = time.monotonic() - t0
        finally:
            pull.close(linger=0)
    assert elapsed < 10 and pub.published == 1 + sum(results) and pub.dropped - dropped0 == results.count(False) > 0


def test_close_flushes_then_gives_up_after_linger() -> None:
    shot = make_shot()
    pub = Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", mode="push", linger_ms=300))
    pull = CTX.socket(zmq.PULL)
    pull.connect(pub.endpoint)
    try:
        while not pub.publish(shot):  # wait for the connection
            time.sleep(0.005)
        for i in range(20):
            pub.publish(make_shot(track_id=i))
        pub.close()  # queued messages still reach the consumer
        assert [decode(pull.recv_multipart()).meta["track_id"] for _ in range(21)] == [7, *range(20)]
    finally:
        pull.close(linger=0)

    stalled = Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", mode="push", sndhwm=1000, linger_ms=300))
    pull = CTX.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1)
    pull.connect(stalled.endpoint)
    try:
        big = make_shot()
        big.context = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)  # ~0.5 MB of JPEG
        while stalled.published < 50:  # far more than the socket buffers hold; the PULL never reads
            stalled.publish(big)
        t0 = time.monotonic()
        stalled.close()
        assert 0.2 < time.monotonic() - t0 < 10  # gave up after linger_ms instead of hanging
    finally:
        pull.close(linger=0)


def test_pub_without_subscribers_drops_silently() -> None:
    shot = make_shot()
    shot.crop, shot.context = shot.crop[:40, :40], shot.context[:60, :50]  # time the sending, not the JPEG encoder
    with Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", linger_ms=0)) as pub:
        t0 = time.monotonic()
        assert all(pub.publish(shot) for _ in range(1000))
        assert time.monotonic() - t0 < 10
    assert (pub.published, pub.dropped) == (1000, 0)  # PUB's losses are invisible to the sender, by design


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_binding_twice_fails_clearly(transport: str, ipc_endpoint: str) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}" if transport == "tcp" else ipc_endpoint
    with Publisher(PublisherConfig(endpoint=endpoint)):
        with pytest.raises(BindError, match=f"cannot bind {endpoint}: .*in use"):
            Publisher(PublisherConfig(endpoint=endpoint, mode="push"))


def test_stale_ipc_file_is_reused(ipc_endpoint: str) -> None:
    path = ipc_endpoint.removeprefix("ipc://")
    with socket.socket(socket.AF_UNIX) as s:  # a socket file left behind by a dead process
        s.bind(path)
    with Publisher(PublisherConfig(endpoint=ipc_endpoint)) as pub:
        assert pub.endpoint == ipc_endpoint


def test_bad_endpoints() -> None:
    with pytest.raises(ValueError, match="only tcp:// and ipc://"):
        PublisherConfig(endpoint="udp://127.0.0.1:5556")
    with pytest.raises(BindError, match="cannot bind tcp://no-such-interface:5556"):
        Publisher(PublisherConfig(endpoint="tcp://no-such-interface:5556"))
    with pytest.raises(BindError, match="cannot bind ipc:///nonexistent-dir/x.sock"):
        Publisher(PublisherConfig(endpoint="ipc:///nonexistent-dir/x.sock"))


def test_subscribe_out_survives_hostile_names_and_keeps_files_private(ipc_endpoint: str, tmp_path: Path) -> None:
    """A 300-character camera name and a 300-digit track id ended `subscribe --out` (ENAMETOOLONG); files were
    0644 in 0755 folders. Now: bounded safe names, every shot saved, files 0600 in 0700 folders."""
    out = tmp_path / "shots"
    shots = [make_shot(camera="c" * 300, track_id=10**300), make_shot(camera="../../etc", track_id=3),
             make_shot(camera="door-1", track_id=4)]
    push = CTX.socket(zmq.PUSH)
    push.bind(ipc_endpoint)
    try:
        t, result = run_subscriber(endpoint=ipc_endpoint, out_dir=out, count=3, timeout_s=10, mode="pull")
        for shot in shots:
            push.send_multipart(encode(shot, include_embedding=True))
        t.join(10)
    finally:
        push.close(linger=0)
    assert result["n"] == 3
    files = [Path(f) for line in result["lines"] for f in json.loads(line)["files"].values()]
    assert len(files) == 12 and all(f.is_file() and out in f.parents for f in files)
    assert all(len(f.name) <= 255 and len(f.parent.name) <= 255 for f in files)
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert all(d.stat().st_mode & 0o777 == 0o700 for d in {out, *(f.parent for f in files)})
    assert {f.parent.name for f in files} >= {"door-1", "_.._etc"}
