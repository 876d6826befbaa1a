"""Push mode with the on-disk spool: nothing lost while no consumer is there, order kept, size cap, restarts."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zmq
from test_publish import make_shot

from agent.pipeline.outputs.spool import Spool, SpoolError, pack, unpack
from agent.pipeline.outputs.zeromq import Publisher, PublisherConfig, decode, encode

pytestmark = pytest.mark.timeout(60)
CTX = zmq.Context.instance()


def msg(i: int, size: int = 100) -> list[bytes]:
    return [b"t", f"{i:04d}".encode(), bytes(size)]


def config(spool: Path, **kw) -> PublisherConfig:
    return PublisherConfig(endpoint="tcp://127.0.0.1:*", mode="push", linger_ms=1000, spool_dir=spool, **kw)


def drain(pub: Publisher, pull: zmq.Socket, n: int, max_messages: int = 64) -> list[int]:
    """pump() until n messages arrived at the PULL (bounded in time); their track ids."""
    got: list[int] = []
    deadline = time.monotonic() + 20
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} arrived"
        pub.pump(max_messages)
        while pull.poll(10):
            got.append(decode(pull.recv_multipart()).meta["track_id"])
    assert not pull.poll(200)
    return got


def test_pack_round_trip_and_corruption() -> None:
    parts = [b"", b"a", bytes(range(256)) * 3]
    assert unpack(pack(parts)) == parts
    for bad in (b"", b"XXXX\0\0\0\0", pack(parts)[:-1], pack(parts) + b"x"):
        with pytest.raises(ValueError):
            unpack(bad)


def test_spool_fifo_cap_and_restart(tmp_path: Path) -> None:
    size = len(pack(msg(0)))
    s = Spool(tmp_path, max_bytes=10 * size)
    for i in range(25):
        assert s.put(msg(i))
    assert (len(s), s.bytes, s.dropped) == (10, 10 * size, 15)  # the 15 oldest deleted, counted
    assert not s.put(msg(99, size=20 * size)) and s.dropped == 16  # larger than the cap on its own
    with pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path, max_bytes=10 * size)
    s.close()

    (tmp_path / ".0000000000000099.msg.tmp").write_bytes(b"half")  # a write cut short by a crash
    s = Spool(tmp_path, max_bytes=10 * size)  # a restart: the same messages, in the same order
    assert not list(tmp_path.glob("*.tmp")) and (len(s), s.bytes) == (10, 10 * size)
    s._path(s._queue[1][0]).write_bytes(b"garbage")
    out = []
    while (m := s.peek()) is not None:
        out.append(int(m[1]))
        s.pop()
    assert out == [15, *range(17, 25)] and s.dropped == 1 and s.bytes == 0 and not list(tmp_path.glob("*.msg"))
    assert s.put(msg(25)) and s._queue[0][0] == 25  # sequence numbers continue
    s.close()
    with pytest.raises(ValueError, match="positive"):
        Spool(tmp_path, max_bytes=0)


def test_no_consumer_then_one_appears(tmp_path: Path) -> None:
    n = 40
    with Publisher(config(tmp_path / "spool")) as pub:
        assert all(pub.publish(make_shot(track_id=i)) for i in range(n))
        assert (pub.published, pub.dropped, pub.spooled, pub.spool_pending) == (0, 0, n, n)
        files = list((tmp_path / "spool").glob("*.msg"))
        assert pub.spool_bytes == sum(p.stat().st_size for p in files) > 0 and len(files) == n
        assert {p.stat().st_mode & 0o777 for p in files} == {0o600}  # biometric data: the owner's only
        pull = CTX.socket(zmq.PULL)
        pull.connect(pub.endpoint)
        try:
            assert drain(pub, pull, n, max_messages=5) == list(range(n))
            assert pub.publish(make_shot(track_id=n))  # spool empty again: sent straight away
            assert decode(pull.recv_multipart()).meta["track_id"] == n
        finally:
            pull.close(linger=0)
    assert (pub.published, pub.spooled, pub.spool_pending, pub.spool_bytes, pub.dropped) == (n + 1, n, 0, 0, 0)


def test_pump_is_bounded_and_never_blocks(tmp_path: Path) -> None:
    with Publisher(config(tmp_path)) as pub:
        for i in range(20):
            pub.publish(make_shot(track_id=i))
        t0 = time.monotonic()
        assert pub.pump() == 0 and time.monotonic() - t0 < 5  # no consumer: returns (a blocking send would hang)
        pull = CTX.socket(zmq.PULL)
        pull.connect(pub.endpoint)
        try:
            deadline = time.monotonic() + 10
            while not (sent := pub.pump(max_messages=3)):
                assert time.monotonic() < deadline
            assert sent == 3 and pub.spool_pending == 17
        finally:
            pull.close(linger=0)


def test_stalled_consumer_keeps_order(tmp_path: Path) -> None:
    """HWM full: later shots queue behind the spooled ones, none lost, none reordered."""
    n = 200
    with Publisher(config(tmp_path, sndhwm=2)) as pub:
        pull = CTX.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 2)
        pull.connect(pub.endpoint)
        try:
            pub.publish(make_shot(track_id=-1))  # sent, or spooled until the PULL has connected
            deadline = time.monotonic() + 10
            while pub.spool_pending:
                assert time.monotonic() < deadline
                pub.pump()
            assert decode(pull.recv_multipart()).meta["track_id"] == -1
            published0, spooled0 = pub.published, pub.spooled
            for i in range(n):  # the PULL does not read meanwhile
                assert pub.publish(make_shot(track_id=i))
            assert pub.spooled > spooled0 and pub.published - published0 < n
            assert drain(pub, pull, n) == list(range(n))
        finally:
            pull.close(linger=0)
    assert pub.dropped == 0 and pub.spool_dropped == 0


def test_cap_drops_oldest(tmp_path: Path) -> None:
    one = len(pack(encode(make_shot(), include_embedding=True)))
    n, keep = 30, 10
    with Publisher(config(tmp_path, spool_max_bytes=int(keep * one * 1.05))) as pub:  # shots differ a little in size
        for i in range(n):
            pub.publish(make_shot(track_id=i))
        assert pub.spool_dropped == n - pub.spool_pending and keep - 1 <= pub.spool_pending <= keep
        left = pub.spool_pending
        pull = CTX.socket(zmq.PULL)
        pull.connect(pub.endpoint)
        try:
            assert drain(pub, pull, left) == list(range(n - left, n))  # the newest survived
        finally:
            pull.close(linger=0)


def test_restart_delivers_what_the_previous_publisher_left(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with Publisher(config(spool)) as first:
        for i in range(15):
            first.publish(make_shot(track_id=i))
    assert first.spool_pending == 15 and len(list(spool.glob("*.msg"))) == 15  # close() kept them on disk
    with Publisher(config(spool)) as second:
        assert second.spool_pending == 15
        second.publish(make_shot(track_id=15))  # behind the old ones
        pull = CTX.socket(zmq.PULL)
        pull.connect(second.endpoint)
        try:
            assert drain(second, pull, 16) == list(range(16))
        finally:
            pull.close(linger=0)
    assert not list(spool.glob("*.msg"))


def test_spool_memory_stays_bounded(tmp_path: Path) -> None:
    """Shots wait on disk: 30 MB spooled, Python memory grows by far less than one percent of it."""
    shot = make_shot()
    shot.context = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)  # ~0.3 MB of JPEG
    with Publisher(config(tmp_path)) as pub:
        pub.publish(shot)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(120):
            pub.publish(shot)
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert pub.spool_bytes > 30e6 and pub.spool_pending == 121
        assert grown < 200_000, f"{grown} bytes kept in memory"


def test_spool_needs_push(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spool needs mode 'push'"):
        PublisherConfig(mode="pub", spool_dir=tmp_path)


def test_spool_takes_only_its_own_names_and_syncs_its_folder(tmp_path: Path, monkeypatch) -> None:
    """A file named with non-ASCII digits ("٣".isdigit() is true) was taken as a message; renames and unlinks were
    not made durable (no fsync of the folder)."""
    size = len(pack(msg(0)))
    (tmp_path / "٣.msg").write_bytes(pack(msg(7)))
    (tmp_path / "12.msg").write_bytes(pack(msg(8)))  # not a name the spool writes either
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    s = Spool(tmp_path, max_bytes=10 * size)
    assert len(s) == 0 and s.peek() is None
    synced.clear()
    assert s.put(msg(1))
    assert str(tmp_path) in synced  # after the rename: the folder itself
    synced.clear()
    s.pop()
    assert synced == [str(tmp_path)]  # after the unlink
    s.close()
