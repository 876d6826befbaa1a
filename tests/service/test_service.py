"""The agent as a process: SIGHUP reload (cameras added/removed, bad config rejected), SIGTERM flush."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml


def write_config(path: Path, clip: Path, cameras: list[str], endpoint: str, broken: bool = False) -> None:
    cfg = {
        "defaults": {"source": {"loop": True, "max_fps": 10}},
        "cameras": [{"id": c, "url": str(clip)} for c in cameras],
        "scoring": {"budget": 20},
        "publisher": {"endpoint": endpoint},
        "metrics": {"listen": None},
    }
    if broken:
        cfg["cameras"][0]["bogus_key"] = 1
    path.write_text(yaml.safe_dump(cfg))


def scored_cameras(trace: Path, after_line: int = 0) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in trace.read_text().splitlines()[after_line:]:
        rec = json.loads(line)
        if rec["event"] == "scored":
            counts[rec["camera"]] = counts.get(rec["camera"], 0) + 1
    return counts


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_sighup_reload_and_sigterm(shared_dir, tmp_path):
    clip = shared_dir / "data/video/inspireface_810_1684206192.mp4"
    cfg, trace, log = tmp_path / "bestshot.yaml", tmp_path / "trace.jsonl", tmp_path / "agent.log"
    endpoint = "ipc://" + str(tmp_path / "pub.sock")
    write_config(cfg, clip, ["a", "b"], endpoint)
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg), "--trace", str(trace)],
                                stderr=err, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: trace.exists() and {"a", "b"} <= scored_cameras(trace).keys(), 120, "both cameras scoring")
        # remove b, add c
        write_config(cfg, clip, ["a", "c"], endpoint)
        mark = len(trace.read_text().splitlines())
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "1 cameras added, 1 removed, 0 restarted, 1 untouched" in log.read_text(), 30, "the reload")
        wait_for(lambda: "c" in scored_cameras(trace, mark), 90, "camera c scoring")
        assert "camera b: ended after" in log.read_text()  # b stopped and flushed
        # an invalid configuration is rejected and the old one keeps running
        write_config(cfg, clip, ["a"], endpoint, broken=True)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected: keeping the running configuration" in log.read_text(), 30, "rejection")
        assert "cameras[0].bogus_key" in log.read_text()
        mark = len(trace.read_text().splitlines())
        wait_for(lambda: {"a", "c"} <= scored_cameras(trace, mark).keys(), 90, "a and c still scoring")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    text = log.read_text()
    assert "SIGTERM: stopping the sources" in text
    # every track that had a scored candidate was published at the end
    scored = {(r["camera"], r["track_id"]) for r in map(json.loads, trace.read_text().splitlines())
              if r["event"] == "scored"}
    published = {(r["camera"], r["track_id"]) for r in map(json.loads, trace.read_text().splitlines())
                 if r["event"] == "published"}
    assert scored == published
