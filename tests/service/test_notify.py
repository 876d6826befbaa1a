"""sd_notify over a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET, and the guarded watchdog."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.service import notify
from agent.service.notify import Watchdog

pytestmark = pytest.mark.timeout(30)


class Systemd:
    """The receiving end: what systemd would read from its notification socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def recv(self, timeout: float = 2.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def drain(self, within: float) -> list[dict[str, str]]:
        """Every message arriving within `within` seconds."""
        out, end = [], time.monotonic() + within
        while (left := end - time.monotonic()) > 0:
            try:
                out.append(self.recv(left))
            except TimeoutError:
                break
        return out


@pytest.fixture
def systemd(monkeypatch, tmp_path: Path) -> Iterator[Systemd]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        yield Systemd(s)


def test_ready_status_reloading_stopping(systemd):
    assert notify.ready("2 cameras")
    assert systemd.recv() == {"READY": "1", "STATUS": "2 cameras"}
    assert notify.status("camera a down: timed out")
    assert systemd.recv() == {"STATUS": "camera a down: timed out"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading()
    msg = systemd.recv()
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.ready()
    assert systemd.recv() == {"READY": "1"}
    assert notify.stopping()
    assert systemd.recv() == {"STOPPING": "1"}


def test_abstract_namespace_socket(monkeypatch):
    name = f"bestshot-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready()
        assert Systemd(s).recv() == {"READY": "1"}


def test_outside_systemd_is_a_no_op(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.ready()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not notify.status("x")
    assert "cannot notify systemd" in caplog.text


def test_watchdog_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert notify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert notify.watchdog_interval() is None
    assert Watchdog(list).start().interval is None  # no thread, nothing sent


def until(cond, timeout: float = 10.0) -> None:
    """Wait for `cond()` (event-driven waits with a generous ceiling: no window of luck on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_watchdog_pings_only_while_alive(systemd, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: a ping every 0.1 s
    problems: list[str] = []
    dog = Watchdog(lambda: list(problems)).start()
    received = []
    try:
        assert dog.interval == 0.2
        received += [systemd.recv(10) for _ in range(3)]
        assert all(p == {"WATCHDOG": "1"} for p in received)
        problems.append("scoring loop stalled for 40 s")  # hung: silence, so systemd kills and restarts
        until(lambda: dog.misses >= 1)  # a check under way when the problem appeared may still have pinged
        pings = dog.pings
        until(lambda: dog.misses >= 4)
        assert dog.pings == pings  # three more checks, no ping
        received += systemd.drain(0.1)
        assert len(received) == pings
        problems.clear()  # recovered before the deadline: pings resume
        received.append(systemd.recv(10))
        assert received[-1] == {"WATCHDOG": "1"}
    finally:
        dog.stop()
    received += systemd.drain(0.1)  # the thread has joined: whatever it sent is already in the socket
    assert len(received) == dog.pings  # every ping arrived, and nothing after stop()
    assert systemd.drain(0.3) == []


def test_watchdog_stays_silent_when_the_check_itself_fails(systemd, caplog):
    def broken() -> list[str]:
        raise RuntimeError("pipeline gone")

    dog = Watchdog(broken, interval=0.2).start()
    try:
        until(lambda: dog.misses >= 3)
    finally:
        dog.stop()
    assert dog.pings == 0 and systemd.drain(0.1) == []
    assert "liveness check failed: RuntimeError: pipeline gone" in caplog.text
