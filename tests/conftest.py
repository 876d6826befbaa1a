"""Shared fixtures: the shared/ data folder and a real RTSP server on loopback (tests/rtsp_server.py)."""

from __future__ import annotations

import functools
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ports import free_port
from skip_guard import (  # noqa: F401 (hooks: under CI only GPU tests may skip)
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

# One prepared-model cache for the whole session (subprocesses inherit it), unless the caller set one.
os.environ.setdefault("BESTSHOT_CACHE", tempfile.mkdtemp(prefix="bestshot-test-cache-"))
# Parallel workers (pytest-xdist) share the cores as the agent's cameras do: each worker's ONNX Runtime sessions and
# agent processes get cores // workers threads (two workers of 2 threads each on 2 cores ran 12 % slower than of 1).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("BESTSHOT_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
CLIP = SHARED / "data" / "video" / "short_hamilton_clip.mp4"  # 640x360 H.264, 29.97 fps, 275 frames
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-gi belongs to it; the venv cannot import gi
_GST_CHECK = """
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [e for e in ("filesrc", "qtdemux", "h264parse", "rtph264pay") if not Gst.ElementFactory.find(e)]
assert not missing, "missing GStreamer elements: " + ", ".join(missing)
"""


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"no shared data folder at {SHARED}")
    return SHARED


@functools.cache
def _rtsp_unavailable() -> str | None:
    """Why tests/rtsp_server.py cannot run here, or None."""
    try:
        done = subprocess.run([SYSTEM_PYTHON, "-c", _GST_CHECK], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{SYSTEM_PYTHON}: {exc}"
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["failed"]
        return f"{SYSTEM_PYTHON} cannot run GstRtspServer ({lines[-1]}); run tests/setup_system.sh as root"
    return None


class RtspServer:
    """One tests/rtsp_server.py process serving `file` at `url`; kill() then start() again keeps the port and url."""

    def __init__(self, file: Path, path: str = "cam", loop: bool = False) -> None:
        self.file, self.loop, self.port = file, loop, free_port()
        self.url = f"rtsp://127.0.0.1:{self.port}/{path}"
        self._args = [SYSTEM_PYTHON, str(HERE / "rtsp_server.py"), "--port", str(self.port), "--path", path,
                      "--file", str(file)] + (["--loop"] if loop else [])
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 20.0) -> RtspServer:
        """Start the server and wait for its READY line (its log goes to the test's captured stderr)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = proc = subprocess.Popen(self._args, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and select.select([proc.stdout], [], [], left)[0]:
            line = proc.stdout.readline()
            if line.strip() == "READY":
                return self
            if not line:  # it exited
                break
        self.kill()
        raise RuntimeError(f"rtsp_server.py on port {self.port}: no READY within {timeout} s (exit {proc.returncode})")

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would; clients see the connection drop."""
        self._end(subprocess.Popen.kill)

    def stop(self) -> None:
        self._end(subprocess.Popen.terminate)

    def _end(self, how: Callable[[subprocess.Popen[str]], None]) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            how(self.proc)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def rtsp_server() -> Iterator[Callable[..., RtspServer]]:
    """A factory: `rtsp_server(file=CLIP, path="cam", loop=False)` starts a server on a free loopback port and
    returns its RtspServer (`.url`, `.kill()`, `.start()`, `.stop()`); all are stopped at teardown."""
    if reason := _rtsp_unavailable():
        pytest.skip(reason)
    servers: list[RtspServer] = []

    def make(file: Path | None = None, path: str = "cam", loop: bool = False) -> RtspServer:
        file = file or CLIP
        if not file.is_file():
            pytest.skip(f"{file} is absent")
        servers.append(server := RtspServer(file, path, loop))
        return server.start()

    yield make
    for server in servers:
        server.stop()
