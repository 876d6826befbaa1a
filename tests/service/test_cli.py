"""The first hour with `bestshot`: `--version`, the camera a `--source` names, and what `run`'s exit code says (0 the
sources ended or a signal stopped it, 1 every input failed for good, 2 a configuration error), with the refusal of
faces in clear on the network and its logged opt-in.

Exit codes come from `python -m agent.cli run` as a child process on tiny clips written here (no faces: the run is
short) with the prepared models; each configuration turns /metrics off so that no port is shared with other runs.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from ports import free_port

from agent.cli.main import build_parser, load_run_config, main
from agent.service.config import CAMERA_ID, ConfigError, derive_camera_id
from agent.service.process import RunSummary

pytestmark = pytest.mark.timeout(300)


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten 64x64 frames without a face: a source that ends normally, soon."""
    path = tmp_path_factory.mktemp("media") / "tiny.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(10):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 20 * i, np.uint8), format="bgr24")))
        out.mux(stream.encode())
    return path


def write_config(path: Path, cameras: dict[str, str], endpoint: str | None = None, **publisher: object) -> Path:
    cfg = {"cameras": [{"id": cid, "url": url} for cid, url in cameras.items()],
           "publisher": {"endpoint": endpoint or f"tcp://127.0.0.1:{free_port()}", **publisher},
           "metrics": {"listen": None}}
    path.write_text(yaml.safe_dump(cfg))
    return path


# --version

def test_version_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"bestshot {version('bestshot-agent')}\n"  # the installed build's


# the camera --source names

@pytest.mark.parametrize("source, expected", [
    ("video.mp4", "video"),
    ("/data/clips/Front Door (2).mkv", "Front_Door_2"),
    ("clip#1.mp4", "clip_1"),
    ("file:///srv/media/lobby.cam.mp4", "lobby.cam"),
    ("rtsp://admin:s3cret@10.0.0.21:554/Streaming/Channels/101?token=abc", "10.0.0.21_Streaming_Channels_101"),
    ("http://cam.example/mjpg/video.mjpg", "cam.example_mjpg_video.mjpg"),
    ("rtsp://gate", "gate"),
    ("rtsp://[fe80::1]:554/live", "fe80_1_live"),
    ("udp://@:5000", "camera"),  # nothing of a name left
    ("Камера.mp4", "camera"),
    ("x" * 100 + ".mp4", "x" * 64),
])
def test_source_names_the_camera(source: str, expected: str) -> None:
    """A file's stem, or a URL's host and path (never its credentials, port or query), made topic-safe."""
    name = derive_camera_id(source)
    assert name == expected and CAMERA_ID.match(name) and len(name) <= 64


def run_config(*argv: str):
    return load_run_config(build_parser().parse_args(["run", *argv]))


def test_run_flags_name_the_camera(tmp_path: Path) -> None:
    assert [c.id for c in run_config("--source", "/media/yard.mp4").cameras] == ["yard"]
    assert [c.id for c in run_config("--source", "rtsp://u:p@10.1.2.3/ch1").cameras] == ["10.1.2.3_ch1"]
    assert [c.id for c in run_config("--source", "/media/yard.mp4", "--camera", "gate-2").cameras] == ["gate-2"]
    path = write_config(tmp_path / "one.yaml", {"door": "/media/a.mp4"})
    cfg = run_config("--config", str(path), "--source", "/media/yard.mp4")
    assert [(c.id, c.url) for c in cfg.cameras] == [("door", "/media/yard.mp4")]  # a configured camera keeps its id
    cfg = run_config("--config", str(path), "--camera", "porch")
    assert [(c.id, c.url) for c in cfg.cameras] == [("porch", "/media/a.mp4")]
    with pytest.raises(ConfigError, match="cameras\\[0\\].id: String should match pattern"):
        run_config("--source", "/media/yard.mp4", "--camera", "front door")
    two = write_config(tmp_path / "two.yaml", {"a": "a.mp4", "b": "b.mp4"})
    with pytest.raises(ConfigError, match="--source and --camera need a configuration with exactly one camera"):
        run_config("--config", str(two), "--camera", "c")


# exit codes

def test_every_input_failed_means_nothing_ran() -> None:
    def summary(inputs: int, failed: dict[str, str]) -> RunSummary:
        return RunSummary(0, 0, 0, 0, 0, 0, 1.0, None, inputs=inputs, failed=failed)

    assert summary(2, {"a": "No such file or directory", "b": "Invalid data"}).every_input_failed
    assert not summary(2, {"a": "No such file or directory"}).every_input_failed
    assert not summary(1, {}).every_input_failed and not summary(0, {}).every_input_failed


def test_exit_1_when_every_input_failed_for_good(tiny_clip: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(50_000))
    path = write_config(tmp_path / "bestshot.yaml", {"gone": str(tmp_path / "nonexistent.mp4"), "bad": str(garbage)})
    r = run_cli("run", "--config", str(path))
    assert r.returncode == 1, r.stderr[-3000:]
    failed = re.search(r"ERROR bestshot: every input failed for good \((.+)\): exit 1", r.stderr)
    assert failed, r.stderr[-3000:]
    assert "camera gone: No such file or directory" in failed[1] and "camera bad: " in failed[1]
    assert "done: 0 frames" in r.stderr and "2 of 2 input(s) failed" in r.stderr


def test_exit_0_when_the_sources_ended_normally(tiny_clip: Path, tmp_path: Path) -> None:
    """Also when one input of several failed: something ran (the log names the one that failed)."""
    path = write_config(tmp_path / "bestshot.yaml", {"gone": str(tmp_path / "nonexistent.mp4"), "tiny": str(tiny_clip)})
    r = run_cli("run", "--config", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "camera tiny: ended after 10 frames" in r.stderr and "1 of 2 input(s) failed" in r.stderr
    assert "every input failed" not in r.stderr
    # the start-up line names the build and the scoring model
    assert re.search(rf"INFO agent.service.process: bestshot {re.escape(version('bestshot-agent'))} starting: "
                     r"model facenet:[0-9a-f]{12}:\S+, 2 camera\(s\)", r.stderr), r.stderr[-3000:]


def test_exit_0_when_stopped_while_a_camera_is_down(tmp_path: Path) -> None:
    """A camera that is down is retried, not a failure: SIGTERM during its retries still ends with 0."""
    url = f"rtsp://127.0.0.1:{free_port()}/down"  # nothing listens: connection refused, again and again
    path = tmp_path / "bestshot.yaml"
    path.write_text(yaml.safe_dump({"cameras": [{"id": "down", "url": url}],
                                    "defaults": {"source": {"backoff_initial_s": 0.1, "backoff_max_s": 0.2}},
                                    "publisher": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
                                    "metrics": {"listen": None}}))
    log = tmp_path / "agent.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while log.read_text().count("camera down: ") < 3:  # at least two retries logged
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the camera was not retried within 120 s"
                time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            proc.kill()
    text = log.read_text()
    assert "retry in" in text and "giving up" not in text and "0 of 1 input(s) failed" in text


def test_exit_2_on_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "bestshot.yaml"
    path.write_text("cameras:\n  - {id: a, url: a.mp4, detector: {knd: yunet}}\n")
    r = run_cli("run", "--config", str(path))
    assert r.returncode == 2 and f"{path}: cameras[0].detector.knd: unknown key" in r.stderr, r.stderr[-3000:]


# faces in clear: refused, unless allowed explicitly (and then a warning at every start)

@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:{port}", "tcp://*:{port}"])
def test_publishing_in_clear_off_loopback_exits_2_naming_the_setting(endpoint: str, tiny_clip: Path) -> None:
    endpoint = endpoint.format(port=free_port())
    r = run_cli("run", "--source", str(tiny_clip), "--publish", endpoint)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"publisher.endpoint {endpoint} can be reached from other machines" in r.stderr
    assert "publisher.allow_plaintext: true" in r.stderr and "starting" not in r.stderr  # refused before any work


def test_allow_plaintext_runs_and_warns_at_start(tiny_clip: Path, tmp_path: Path) -> None:
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    path = write_config(tmp_path / "bestshot.yaml", {"tiny": str(tiny_clip)}, endpoint, allow_plaintext=True)
    r = run_cli("run", "--config", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"WARNING agent.service.process: publisher.endpoint {endpoint} can be reached from other machines and "
            "publisher.curve is not set: best shots (faces, biometric data) would cross the network unencrypted "
            "(accepted by publisher.allow_plaintext: true)") in r.stderr


@pytest.mark.parametrize("taken", ["publisher", "metrics"])
def test_an_address_in_use_is_one_clear_line_and_exit_1(tiny_clip: Path, tmp_path: Path, taken: str) -> None:
    """Another process holds the publisher's endpoint or the metrics port: one error line naming it, no traceback,
    exit 1 (systemd restarts; the address may come free)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = yaml.safe_load(write_config(tmp_path / "bestshot.yaml", {"tiny": str(tiny_clip)}).read_text())
        if taken == "publisher":
            cfg["publisher"]["endpoint"] = f"tcp://127.0.0.1:{port}"
        else:
            cfg["metrics"]["listen"] = f"127.0.0.1:{port}"
        (tmp_path / "bestshot.yaml").write_text(yaml.safe_dump(cfg))
        r = run_cli("run", "--config", str(tmp_path / "bestshot.yaml"))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    named = f"cannot bind tcp://127.0.0.1:{port}" if taken == "publisher" else f"metrics.listen 127.0.0.1:{port}"
    assert re.search(rf"ERROR bestshot: .*{re.escape(named)}.*in use", r.stderr), r.stderr[-3000:]
