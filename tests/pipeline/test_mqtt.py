"""The MQTT output against a real mosquitto on loopback: a persistent QoS-1 subscriber that is away, and a broker
restart in between, still gets every event that was acked; the retained snapshot and availability for a late
subscriber; the last will when the agent dies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from brokers import Mosquitto, real_shot, update_of, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from agent.pipeline.outputs.mqtt import MqttConfig, MqttOutput

pytestmark = pytest.mark.timeout(120)

# An agent's MQTT output in its own process, killed by the test (SIGKILL: no DISCONNECT, the broker's last will).
VICTIM = """
import sys, time
from agent.pipeline.outputs.mqtt import MqttConfig, MqttOutput
out = MqttOutput(MqttConfig(port=int(sys.argv[1]), topic_prefix="victim", client_id="victim"))
while not out.health()[0]:
    time.sleep(0.05)
print("online", flush=True)
time.sleep(120)
"""


class Subscriber:
    """A paho client with a fixed id; clean_session False: the broker keeps its subscriptions and QoS-1 messages
    while it is away."""

    def __init__(self, port: int, client_id: str, topics: list[str], persistent: bool = True) -> None:
        self.port, self.topics, self.got = port, topics, []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.got.append(m)

    def connect(self) -> Subscriber:
        self.subscribed.clear()
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "no SUBACK"
        return self

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def events(self) -> list[tuple[int, str, str]]:
        """(track id, type, shot id) of each event received, a QoS-1 redelivery counted once."""
        seen = []
        for m in self.got:
            e = json.loads(m.payload)
            key = (e["after"]["track_id"], e["type"], e["after"]["shot_id"])
            if key not in seen:
                seen.append(key)
        return seen


def test_persistent_subscriber_away_and_broker_restart_lose_no_acked_event(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto").start()
    nvr = Subscriber(broker.port, "nvr", ["bestshot/+/events"]).connect()
    nvr.disconnect()  # away: the broker queues its QoS-1 events
    out = MqttOutput(MqttConfig(port=broker.port))
    try:
        wait_until("connected", lambda: out.health()[0])
        shots = [(update_of(real_shot(1)), "u1"), (real_shot(1), "b1"), (real_shot(2), "b2")]
        for shot, shot_id in shots:
            assert out.submit(shot, shot_id)
        wait_until("3 shots acked", lambda: out.counts.acked == 3)
        broker.stop()  # SIGTERM: mosquitto writes its persistence file
        broker.start()
        wait_until("reconnected", lambda: out.health()[0], timeout_s=30)
        assert out.submit(real_shot(3), "b3")
        wait_until("4 shots acked", lambda: out.counts.acked == 4)
        nvr.connect()
        expected = [(1, "new", "u1"), (1, "end", "b1"), (2, "new", "b2"), (2, "end", "b2"), (3, "new", "b3"),
                    (3, "end", "b3")]
        wait_until("every event", lambda: len(nvr.events()) >= len(expected))
        assert nvr.events() == expected
        first = json.loads(nvr.got[0].payload)
        assert first["before"] is None and first["after"]["status"] == "update"
        assert "embedding" not in first["after"] and "embedding_dim" not in first["after"]  # none unless asked
        assert all(m.qos == 1 for m in nvr.got)

        late = Subscriber(broker.port, "late", ["bestshot/door-1/snapshot", "bestshot/available"],
                          persistent=False).connect()
        wait_until("the retained messages", lambda: len(late.got) >= 2)
        by_topic = {m.topic: m for m in late.got}
        snap = cv2.imdecode(np.frombuffer(by_topic["bestshot/door-1/snapshot"].payload, np.uint8), cv2.IMREAD_COLOR)
        assert snap.shape == (240, 320, 3) and by_topic["bestshot/door-1/snapshot"].retain
        assert by_topic["bestshot/available"].payload == b"online"
        late.disconnect()
    finally:
        out.close(5)
        nvr.disconnect()
    late = Subscriber(broker.port, "later", ["bestshot/available"], persistent=False).connect()
    wait_until("offline after close", lambda: any(m.payload == b"offline" for m in late.got))
    late.disconnect()
    broker.kill()


def test_last_will_says_offline_when_the_agent_dies(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto").start()
    watcher = Subscriber(broker.port, "watcher", ["victim/available"], persistent=False).connect()
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(broker.port)], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "online"
        wait_until("online", lambda: [m.payload for m in watcher.got][-1:] == [b"online"])
        victim.kill()  # no DISCONNECT: the broker publishes the last will
        wait_until("the last will", lambda: [m.payload for m in watcher.got][-1:] == [b"offline"])
    finally:
        victim.kill()
        victim.wait(10)
        watcher.disconnect()
        broker.kill()


def test_plaintext_refused_off_loopback() -> None:
    with pytest.raises(ValueError, match="unencrypted"):
        MqttConfig(host="10.0.0.7")
    assert MqttConfig(host="10.0.0.7", allow_plaintext=True).plaintext_exposure()


def test_the_agent_runs_a_clip_into_nats_and_mqtt_with_one_id_per_shot(shared_dir: Path, tmp_path: Path) -> None:
    """`bestshot run` with a YAML `outputs:` list: every shot the agent published is in the JetStream stream once
    and on MQTT, under the same shot id, and the stream's payloads decode. (The test server keeps 1 GiB of JetStream
    storage: a stream asking for the default 8 GiB is refused, which the output logs and retries.)"""
    import yaml
    from brokers import NatsNode, run, stream_ids

    node = NatsNode(tmp_path / "nats").start()
    broker = Mosquitto(tmp_path / "mosquitto").start()
    nvr = Subscriber(broker.port, "nvr", ["bestshot/+/events"]).connect()
    try:
        wait_until("JetStream", lambda: run(_js_up(node.url)), timeout_s=60, every_s=0.3)
        cfg = {"cameras": [{"id": "hall", "url": str(shared_dir / "data/video/short_hamilton_clip.mp4"),
                            "source": {"duration_s": 4}}],
               "outputs": [{"type": "nats", "servers": [node.url], "site": "hq", "stream": {"max_bytes": 2**28}},
                           {"type": "mqtt", "port": broker.port}],
               "metrics": {"listen": None}}
        path = tmp_path / "bestshot.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(path)], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        published = [line for line in r.stderr.splitlines() if "shot, frame" in line and "[dropped]" not in line]
        assert published, r.stderr[-3000:]
        ids = run(stream_ids([node.url]))
        assert len(ids) == len(set(ids)) == len(published)
        n = len(published)  # the run's summary counts each shot once, and says what each output took
        assert f"{n} shots published (nats {n}, mqtt {n}) (0 dropped)" in r.stderr, r.stderr[-1000:]
        wait_until("every MQTT end event", lambda: {e[2] for e in nvr.events() if e[1] == "end"} >= set(ids),
                   timeout_s=30)
        assert {e[2] for e in nvr.events()} == set(ids)
        for seq in range(1, len(ids) + 1):
            msg = run(_get(node.url, seq))
            face = cv2.imdecode(np.frombuffer(msg.face_jpeg, np.uint8), cv2.IMREAD_COLOR)
            assert msg.meta["camera"] == "hall" and msg.meta["shot_id"] == ids[seq - 1] and face.size > 0
            assert msg.embedding is not None and msg.embedding.shape == (msg.meta["embedding_dim"],)
    finally:
        nvr.disconnect()
        broker.kill()
        node.kill()


async def _js_up(url: str) -> bool:
    from brokers import _js_ready

    return await _js_ready([url])


async def _get(url: str, seq: int):
    from brokers import connect

    from agent.pipeline.outputs.nats import decode_body

    nc = await connect([url])
    try:
        return decode_body((await nc.jetstream(timeout=5).get_msg("BESTSHOT", seq)).data)
    finally:
        await nc.close()
