"""The fan-out (agent/pipeline/outputs/base.py): every output gets each shot with one shared shot id, a broken or
refusing output costs the others nothing, and `outputs:` in the YAML adds outputs beside `publisher:`."""

from __future__ import annotations

import json

import pytest
import zmq
from test_publish import free_port, make_shot

from agent.pipeline.outputs.base import Counts, Outputs
from agent.pipeline.outputs.zeromq import Publisher, PublisherConfig, decode
from agent.service.config import parse_config

pytestmark = pytest.mark.timeout(60)


class Broken:
    name = "broken"

    def __init__(self) -> None:
        self.counts = Counts()

    def submit(self, shot, shot_id) -> bool:
        raise RuntimeError("transport fell over")

    def health(self):
        return False, {"reason": "fell over"}

    def close(self, timeout_s: float) -> None:
        pass


def test_every_output_gets_the_shot_with_one_id_and_a_broken_one_costs_nothing() -> None:
    ctx = zmq.Context.instance()
    pubs = [Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", mode="push", name=f"z{i}")) for i in range(2)]
    pulls = []
    for p in pubs:
        s = ctx.socket(zmq.PULL)
        s.connect(p.endpoint)
        pulls.append(s)
    outputs = Outputs([Broken(), *pubs])
    try:
        with pytest.raises(ValueError, match="already registered"):
            outputs.add(Broken())
        for _ in range(200):  # PUSH needs a connected peer: wait (10 s at most) until each can take a message
            if all(p._sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT for p in pubs):
                break
            pulls[0].poll(50)
        assert outputs.publish(make_shot(track_id=3))
        ids = []
        for s in pulls:
            assert s.poll(10_000), "an output did not get the shot"
            msg = decode(s.recv_multipart())
            assert msg.meta["track_id"] == 3
            ids.append(msg.meta["shot_id"])
        assert ids[0] == ids[1] and len(ids[0]) == 32
        assert outputs.published == 2 and outputs.dropped == 1  # the broken output's loss, counted
        health = outputs.health()
        assert health["broken"]["ok"] is False and health["broken"]["dropped"] == 1
        assert health["z0"]["ok"] and health["z0"]["published"] == 1
    finally:
        outputs.close(1.0)
        for s in pulls:
            s.close(linger=0)


def test_outputs_section_beside_publisher() -> None:
    port = free_port()
    cams = [{"id": "a", "url": "x.mp4"}]
    out = [{"type": "zeromq", "name": "z", "endpoint": f"tcp://127.0.0.1:{port}"}]
    only = parse_config({"cameras": cams, "outputs": out})
    assert [c.name for c in only.output_configs()] == ["z"]  # no default publisher when outputs are listed
    both = parse_config({"cameras": cams, "publisher": {"endpoint": "tcp://127.0.0.1:1"}, "outputs": out})
    assert [c.name for c in both.output_configs()] == ["zeromq", "z"]
    assert [c.name for c in parse_config({"cameras": cams}).output_configs()] == ["zeromq"]  # backward compatible
    with pytest.raises(Exception, match="two outputs are named 'zeromq'"):
        parse_config({"cameras": cams, "publisher": {}, "outputs": [{"type": "zeromq"}]})
    with pytest.raises(Exception, match="unencrypted"):
        parse_config({"cameras": cams, "outputs": [{"type": "zeromq", "endpoint": "tcp://10.1.2.3:5556"}]})
    assert json.dumps(both.model_dump(mode="json"))  # serialisable (check-config, schema)


def test_nats_and_mqtt_outputs_in_yaml_take_secrets_only_by_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.pipeline.outputs.mqtt import MqttConfig
    from agent.pipeline.outputs.nats import NatsConfig
    from agent.service.process import open_outputs

    cams = [{"id": "a", "url": "x.mp4"}]
    out = [{"type": "nats", "site": "hq", "user": "edge", "password": {"env": "NATS_PW"}, "stream": {"replicas": 3}},
           {"type": "mqtt", "username": "nvr", "password": {"credential": "mqtt-password"}}]
    cfg = parse_config({"cameras": cams, "outputs": out})
    nats_cfg, mqtt_cfg = cfg.output_configs()
    assert isinstance(nats_cfg, NatsConfig) and nats_cfg.stream.replicas == 3 and nats_cfg.password.env == "NATS_PW"
    assert isinstance(mqtt_cfg, MqttConfig) and mqtt_cfg.password.credential == "mqtt-password"
    for bad, why in [({"type": "nats", "user": "u", "password": "in-clear"}, "password"),
                     ({"type": "nats", "servers": ["nats://10.1.2.3:4222"]}, "unencrypted"),
                     ({"type": "nats", "site": "a.b"}, "one subject token"),
                     ({"type": "mqtt", "host": "nvr.lan"}, "unencrypted"),
                     ({"type": "kafka"}, "type")]:
        with pytest.raises(Exception, match=why):
            parse_config({"cameras": cams, "outputs": [bad]})
    monkeypatch.delenv("NATS_PW", raising=False)
    with pytest.raises(ValueError, match="outputs nats: password: the environment variable NATS_PW is unset"):
        open_outputs([nats_cfg])  # read at start, before anything connects
