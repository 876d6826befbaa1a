"""Property-based fuzzing (hypothesis) of the two parsers that take input from outside: the upstream wire decoder and
the configuration loader. Whatever they are fed, only their own error type may come out, and memory stays bounded."""

from __future__ import annotations

import json
import resource

import cv2
import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.pipeline.sources.upstream import Malformed, decode_message
from agent.service.config import ConfigError, load_config

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

JPEG = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))[1].tobytes()
numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                    st.text(max_size=5), st.integers(min_value=-(10**400), max_value=10**400))
json_values = st.recursive(st.one_of(numbers, st.text(max_size=20)),
                           lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=6)),
                           max_leaves=30)
tracks = st.lists(st.fixed_dictionaries({"id": numbers, "box": st.one_of(st.lists(numbers, max_size=5), json_values)},
                                        optional={"score": numbers, "landmarks": json_values}), max_size=80)
headers = st.fixed_dictionaries(
    {"camera": st.one_of(st.text(max_size=80), numbers), "frame_id": numbers, "pts": numbers, "tracks": tracks,
     "encoding": st.sampled_from(["jpeg", "raw", "png", ""])},
    optional={"shape": st.one_of(st.lists(st.integers(-5, 10**6), max_size=4), json_values)})


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_decode(parts: list[bytes]) -> None:
    try:
        frame, faces = decode_message(parts)
    except Malformed:
        return
    h, w = frame.image.shape[:2]
    assert h * w <= 16_000_000 and len(faces) <= 64 and 1 <= len(frame.camera) <= 64


@FUZZ
@given(header=headers, image=st.one_of(st.just(JPEG), st.binary(max_size=2000)), topic=st.booleans())
def test_upstream_decoder_raises_only_malformed(header: dict, image: bytes, topic: bool) -> None:
    check_decode(([b"cam"] if topic else []) + [json.dumps(header).encode(), image])


@FUZZ
@given(parts=st.lists(st.binary(max_size=300), max_size=4))
def test_upstream_decoder_on_raw_bytes(parts: list[bytes]) -> None:
    check_decode(parts)


def test_upstream_decoder_memory_stays_flat_under_a_flood() -> None:
    """2,000 hostile messages (huge claimed images, many tracks, deep JSON): peak RSS grows by less than 50 MB."""
    rng = np.random.default_rng(0)
    before = rss_mb()
    tiny = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()
    sof = tiny.index(b"\xff\xc0")
    huge = tiny[: sof + 5] + (20000).to_bytes(2, "big") * 2 + tiny[sof + 9 :]
    base = {"camera": "door", "frame_id": 1, "pts": 0.0, "encoding": "jpeg"}
    for i in range(2000):
        kind = i % 4
        if kind == 0:
            parts = [json.dumps({**base, "tracks": []}).encode(), huge]
        elif kind == 1:
            parts = [json.dumps({**base, "tracks": [{"id": j, "box": [0, 0, 64, 48]} for j in range(300)]}).encode(),
                     JPEG]
        elif kind == 2:
            parts = [b"[" * 50_000, JPEG]
        else:
            parts = [json.dumps({**base, "encoding": "raw", "shape": [9000, 9000, 3], "tracks": []}).encode(),
                     rng.bytes(1000)]
        check_decode(parts)
    assert rss_mb() - before < 50


yaml_scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.booleans(), st.none(),
                         st.text(max_size=30))
yaml_docs = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.dictionaries(st.sampled_from(["cameras", "defaults", "scoring", "publisher", "metrics", "models", "backend",
                                     "id", "url", "upstream", "endpoint", "selection", "detector", "min_quality",
                                     "budget", "max_batch", "top_k", "curve", "spool", "x"]), inner, max_size=6)),
    max_leaves=25)


@FUZZ
@given(doc=yaml_docs)
def test_config_loader_raises_only_config_error(tmp_path_factory, doc) -> None:
    path = tmp_path_factory.mktemp("cfg") / "bestshot.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_config(path)
    except ConfigError as e:
        assert e.errors and all(isinstance(x, str) and x for x in e.errors)


@FUZZ
@given(text=st.text(max_size=400))
def test_config_loader_on_arbitrary_text(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("cfg") / "bestshot.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        assert e.errors
