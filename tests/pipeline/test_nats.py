"""The NATS JetStream output against real nats-server processes on loopback: a 3-node cluster whose stream leader is
killed three times while shots flow and a consumer that dies holding a batch; a server down while shots come, the
agent restarted, the server back; and bad input (wrong credentials, unreachable, conflicting stream, oversized)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq
from brokers import (
    NatsCluster,
    NatsNode,
    Server,
    binary,
    connect,
    free_port,
    real_shot,
    run,
    stream_ids,
    stream_state,
    wait_until,
)
from nats.js.api import StreamConfig

from agent.cli.subscribe_nats import NatsConsumer, subscribe_nats
from agent.common.secrets import Secret
from agent.pipeline.outputs.base import Outputs, new_shot_id
from agent.pipeline.outputs.nats import NatsConfig, NatsOutput, StreamSettings, decode_body
from agent.pipeline.outputs.zeromq import Publisher, PublisherConfig, decode

pytestmark = pytest.mark.timeout(180)
MiB = 2**20

# A consumer that takes a batch and dies before acknowledging any of it (the test SIGKILLs it once it says so).
DYING_CONSUMER = """
import asyncio, sys, nats
from nats.js.api import AckPolicy, ConsumerConfig
async def main():
    async def quiet(e): pass
    nc = await nats.connect(servers=sys.argv[1].split(","), error_cb=quiet)
    for attempt in range(10):  # right after the leader kills the cluster's API may still time out: bounded retries
        try:
            sub = await nc.jetstream().pull_subscribe("bestshot.>", durable=sys.argv[2], stream="BESTSHOT",
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=2.0, max_deliver=-1))
            break
        except nats.errors.TimeoutError:
            if attempt == 9:
                raise
            await asyncio.sleep(1)
    msgs = await sub.fetch(10, timeout=20)
    print("fetched", len(msgs), flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


def _leader(urls: list[str], not_this: str | None = None) -> str:
    found: list[str] = []

    def elected() -> bool:
        try:
            leader, _, _ = run(stream_state(urls))
        except Exception:  # no leader to answer yet
            return False
        found[:] = [leader] if leader not in (None, not_this) else []
        return bool(found)

    wait_until(f"a stream leader other than {not_this}", elected, timeout_s=60, every_s=0.2)
    return found[0]


def _current(urls: list[str]) -> bool:
    try:
        return run(stream_state(urls))[1]
    except Exception:
        return False


def test_leader_killed_three_times_and_a_consumer_killed_mid_batch_lose_nothing(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path / "cluster").start()
    out = NatsOutput(NatsConfig(servers=cluster.urls, site="lab", ack_timeout_s=2.0, spool_dir=tmp_path / "spool",
                                stream=StreamSettings(replicas=3, max_bytes=256 * MiB)))
    published: list[str] = []
    stop = threading.Event()

    def camera() -> None:  # three cameras' shots, 20 a second, until the kills are over
        i = 0
        while not stop.is_set():
            published.append(new_shot_id())
            assert out.submit(real_shot(i, camera=f"cam{i % 3}", frame_index=i), published[-1])
            i += 1
            time.sleep(0.05)

    producer = threading.Thread(target=camera, daemon=True)
    try:
        producer.start()
        wait_until("the first shots acked", lambda: out.counts.acked >= 10)
        leader, kills = None, []
        for _ in range(3):
            leader = _leader(cluster.urls, not_this=leader)
            cluster.node(leader).kill()  # SIGKILL
            kills.append((leader, len(published)))
            _leader(cluster.urls, not_this=leader)  # a new one is elected among the two left
            cluster.node(leader).start()
            wait_until("every replica current again", lambda: _current(cluster.urls), timeout_s=60, every_s=0.2)
        stop.set()
        producer.join(10)
        out.close(60)
        c = out.counts
        assert c.dropped == 0 and out.spool_pending == 0
        assert c.published + c.spooled >= len(published) and c.acked == len(published), c
        assert run(stream_state(cluster.urls))[2] == len(published)  # stored once each: retries de-duplicated

        url = ",".join(cluster.urls)
        dying = subprocess.Popen([sys.executable, "-c", DYING_CONSUMER, url, "archive"], stdout=subprocess.PIPE,
                                 text=True)
        try:
            line = dying.stdout.readline()
            assert line.startswith("fetched "), line
            held = int(line.split()[1])
        finally:
            dying.kill()  # mid-batch: none of it acked
            dying.wait(10)
        lines: list[str] = []
        stats = subscribe_nats(NatsConsumer(url=url, durable="archive", ack_wait_s=2.0), tmp_path / "received",
                               count=len(published), timeout_s=30, write_line=lines.append)
        received = [json.loads(x) for x in lines]
        ids = [m["shot_id"] for m in received]
        assert sorted(ids) == sorted(published) and len(set(ids)) == len(ids)  # every shot, once
        assert stats.redelivered >= held > 0  # the dead consumer's batch came again
        for m in received:
            face, context = (cv2.imread(m["files"][k]) for k in ("face", "context"))
            assert face.shape == (112, 112, 3) and context.shape == (240, 320, 3)
            assert np.fromfile(m["files"]["embedding"], "<f4").shape == (512,)
        print(f"\nNATS cluster: {len(published)} shots published, {len(kills)} leader kills {kills}, "
              f"{c.retried} retries, {out.duplicates} duplicates removed by the stream, {c.spooled} spooled, "
              f"{held} held by the killed consumer, {stats.redelivered} redelivered, {len(set(ids))} received, "
              f"lost {len(set(published) - set(ids))}")
    finally:
        stop.set()
        out.close(1)
        cluster.stop()


def test_a_consumer_started_while_the_cluster_has_no_quorum_waits_for_it(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """`bestshot subscribe nats://` started while JetStream cannot answer (two of three nodes down, as during a
    leader election) retries its set-up and then receives every shot."""
    caplog.set_level(logging.WARNING, logger="agent.cli.subscribe_nats")
    cluster = NatsCluster(tmp_path / "cluster").start()
    out = NatsOutput(NatsConfig(servers=cluster.urls, stream=StreamSettings(replicas=3, max_bytes=64 * MiB)))
    ids = [new_shot_id() for _ in range(3)]
    try:
        for i, shot_id in enumerate(ids):
            out.submit(real_shot(i), shot_id)
        wait_until("3 acked", lambda: out.counts.acked == 3)
        for node in cluster.nodes[1:]:
            node.kill()
        lines: list[str] = []
        done: list[Any] = []
        consumer = NatsConsumer(url=cluster.urls[0], durable="late", setup_timeout_s=120)
        thread = threading.Thread(target=lambda: done.append(subscribe_nats(consumer, None, 3, 60, lines.append)))
        thread.start()
        wait_until("the set-up retried", lambda: "JetStream not ready" in caplog.text, timeout_s=60)
        assert not done  # still waiting, not failed
        for node in cluster.nodes[1:]:
            node.start()
        thread.join(150)
        assert not thread.is_alive() and done and done[0].handled == 3
        assert sorted(json.loads(x)["shot_id"] for x in lines) == sorted(ids)
    finally:
        out.close(1)
        cluster.stop()


def test_a_server_without_jetstream_is_an_error_that_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    plain = Server([binary("nats-server"), "-a", "127.0.0.1", "-p", str(port)], port, tmp_path / "nats.log").start()
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError, match=f"nats://127.0.0.1:{port}: JetStreamUnavailable: JetStream did not answer "
                                          r"for 3 s \(ServiceUnavailableError\): is it enabled on the server"):
            subscribe_nats(NatsConsumer(url=f"nats://127.0.0.1:{port}", setup_timeout_s=3), None, 1, 5)
        assert 3 <= time.monotonic() - t0 < 30
        assert "JetStream not ready" in caplog.text  # each try logged
    finally:
        plain.kill()


def test_server_down_then_agent_restarted_then_server_back_sends_every_spooled_shot_in_order(tmp_path: Path) -> None:
    node = NatsNode(tmp_path / "node").start()
    cfg = NatsConfig(servers=[node.url], site="lab", ack_timeout_s=1.0, spool_dir=tmp_path / "spool",
                     stream=StreamSettings(max_bytes=64 * MiB))
    order = [new_shot_id() for _ in range(10)]
    first = NatsOutput(cfg)
    try:
        for i in range(3):
            first.submit(real_shot(i), order[i])
        wait_until("3 acked", lambda: first.counts.acked == 3)
        node.kill()
        for i in range(3, 8):
            first.submit(real_shot(i), order[i])
        wait_until("5 in the spool", lambda: first.spool_pending == 5)  # (shots before the connection spool too)
        assert not first.health()[0]
    finally:
        first.close(10)  # the agent stops: the spool stays on disk
    assert len(list((tmp_path / "spool").glob("*.msg"))) == 5
    second = NatsOutput(cfg)  # the agent started again, the server still down
    try:
        for i in range(8, 10):
            second.submit(real_shot(i), order[i])
        wait_until("the new shots spooled behind the old", lambda: second.spool_pending == 7)
        node.start()
        wait_until("every shot acked", lambda: second.counts.acked == 7)
        assert second.spool_pending == 0 and second.counts.dropped == 0
        second.submit(real_shot(9), order[9])  # a retry whose first copy had arrived: stored once
        wait_until("the copy acked", lambda: second.counts.acked == 8)
        assert second.duplicates == 1
    finally:
        second.close(5)
    assert run(stream_ids([node.url])) == order
    from agent.cli.main import main  # the command line: `bestshot subscribe nats://...`

    assert main(["subscribe", node.url, "--durable", "cli", "--count", "10", "--timeout", "20",
                 "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out" / "door-1").glob("*.json"))) == 10
    got = []  # what `bestshot subscribe nats://... --view` shows on the live page: every shot, in order
    subscribe_nats(NatsConsumer(url=node.url, durable="view"), None, 10, 20, write_line=lambda _: None,
                   on_message=got.append)
    assert [m.meta["shot_id"] for m in got] == order and all(m.face_jpeg for m in got)
    assert main(["subscribe", node.url, "--durable", "cli-view", "--count", "10", "--timeout", "20",
                 "--view", f"127.0.0.1:{free_port()}"]) == 0
    node.kill()


def test_a_fetch_that_times_out_between_requests_does_not_end_the_consumer(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py's fetch may raise asyncio's TimeoutError instead of its own (the clean-clone run's cluster test hit it
    after a leader kill): the consumer fetches again instead of ending with an error."""
    from nats.js.client import JetStreamContext

    node = NatsNode(tmp_path / "node").start()
    out = NatsOutput(NatsConfig(servers=[node.url], site="lab", stream=StreamSettings(max_bytes=64 * MiB)))
    ids = [new_shot_id() for _ in range(3)]
    try:
        for i, shot_id in enumerate(ids):
            out.submit(real_shot(i), shot_id)
        wait_until("3 acked", lambda: out.counts.acked == 3)
        fetch, calls = JetStreamContext.PullSubscription.fetch, []

        async def flaky_fetch(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise asyncio.TimeoutError
            return await fetch(self, *args, **kwargs)

        monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", flaky_fetch)
        got = []
        subscribe_nats(NatsConsumer(url=node.url, durable="t"), None, 3, 20, write_line=lambda _: None,
                       on_message=got.append)
        assert len(calls) >= 2 and [m.meta["shot_id"] for m in got] == ids
    finally:
        out.close(5)
        node.kill()


def _zeromq_pair() -> tuple[Publisher, zmq.Socket]:
    pub = Publisher(PublisherConfig(endpoint="tcp://127.0.0.1:*", mode="push", name="zeromq"))
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.connect(pub.endpoint)
    wait_until("the ZeroMQ consumer connected", lambda: bool(pub._sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT))
    return pub, pull


def test_wrong_credentials_and_an_unreachable_server_are_retried_while_other_outputs_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING, logger="agent.pipeline.outputs.nats")
    node = NatsNode(tmp_path / "node", extra="authorization { user: edge, password: right-password }").start()
    monkeypatch.setenv("RIGHT", "right-password")
    monkeypatch.setenv("WRONG", "wrong-password")
    s = StreamSettings(max_bytes=64 * MiB)
    zeromq, pull = _zeromq_pair()
    outputs = Outputs([
        zeromq,
        NatsOutput(NatsConfig(name="right", servers=[node.url], user="edge", password=Secret(env="RIGHT"), stream=s)),
        NatsOutput(NatsConfig(name="wrong", servers=[node.url], user="edge", password=Secret(env="WRONG"), stream=s,
                              spool_dir=tmp_path / "spool-wrong")),
        NatsOutput(NatsConfig(name="down", servers=[f"nats://127.0.0.1:{free_port()}"], stream=s,
                              spool_dir=tmp_path / "spool-down")),
    ])
    right, wrong, down = outputs.outputs[1:]
    try:
        for i in range(5):
            assert outputs.publish(real_shot(i))
        for _ in range(5):
            assert pull.poll(10_000), "the ZeroMQ output stopped delivering"
            decode(pull.recv_multipart())
        wait_until("the right password delivers", lambda: right.counts.acked == 5)
        wait_until("the others spool", lambda: wrong.counts.spooled == 5 and down.counts.spooled == 5)
        health = outputs.health()
        assert health["zeromq"]["ok"] and health["right"]["ok"]
        assert not health["wrong"]["ok"] and "authorization violation" in health["wrong"]["reason"].lower()
        assert not health["down"]["ok"] and "connect" in health["down"]["reason"].lower()
        logged = caplog.text.lower()
        assert "nats output wrong: " in logged and "authorization violation" in logged and "retrying" in logged
        assert "nats output down: " in logged
        with pytest.raises(ValueError, match="environment variable UNSET is unset or empty"):
            NatsOutput(NatsConfig(servers=[node.url], user="edge", password=Secret(env="UNSET")))
    finally:
        outputs.close(2)
        pull.close(linger=0)
        node.kill()


def test_a_conflicting_stream_is_an_error_naming_each_difference(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    node = NatsNode(tmp_path / "node").start()

    async def create() -> None:
        nc = await connect([node.url])
        await nc.jetstream().add_stream(StreamConfig(name="BESTSHOT", subjects=["bestshot.>"], max_age=60,
                                                     duplicate_window=60, max_bytes=64 * MiB))
        await nc.close()

    run(create())
    out = NatsOutput(NatsConfig(servers=[node.url], spool_dir=tmp_path / "spool",
                                stream=StreamSettings(max_bytes=64 * MiB)))
    try:
        out.submit(real_shot(1), new_shot_id())
        # the stream is checked at connect, so the conflict can show before the shot reaches the spool
        wait_until("the conflict found and the shot spooled",
                   lambda: "other settings" in out.health()[1].get("reason", "") and out.counts.spooled == 1)
        ok, details = out.health()
        assert out.counts.spooled == 1 and not ok
        assert "stream BESTSHOT exists with other settings: max_age_s is 60, configured 604800" in details["reason"]
        assert "duplicate_window_s is 60, configured 600" in details["reason"]
        assert any(r.levelno == logging.ERROR and "exists with other settings" in r.getMessage()
                   for r in caplog.records)
        assert out.counts.published == 0  # nothing went into a stream that is not the configured one
    finally:
        out.close(1)
        node.kill()


def test_an_oversized_shot_is_refused_counted_and_the_next_one_delivered(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    node = NatsNode(tmp_path / "node", extra="max_payload: 65536").start()
    out = NatsOutput(NatsConfig(servers=[node.url], stream=StreamSettings(max_bytes=64 * MiB)))
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)  # a JPEG of ~0.5 MB
    try:
        big, small = real_shot(1), real_shot(2)
        big.context = noise
        out.submit(big, "big")
        out.submit(small, "small")
        wait_until("the small shot acked", lambda: out.counts.acked == 1)
        assert out.counts.dropped == 1 and out.counts.published == 2
        assert "shot big" in caplog.text and "refused for good" in caplog.text
        assert run(stream_ids([node.url])) == ["small"]
    finally:
        out.close(1)
        node.kill()


def test_message_layout_reads_back() -> None:
    """The body is the ZeroMQ parts framed as the spool frames them; the metadata is read without the images."""
    from agent.pipeline.outputs.spool import pack
    from agent.pipeline.outputs.zeromq import encode

    parts = encode(real_shot(3), True, 90, "abc")
    msg = decode_body(pack(parts))
    assert msg.meta["shot_id"] == "abc" and msg.embedding.shape == (512,)
    with pytest.raises(ValueError):
        decode_body(b"BSS1" + bytes(8))



def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    ca, ca_key, cert, key, csr = (folder / n for n in ("ca.crt", "ca.key", "server.crt", "server.key", "server.csr"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
                  "-subj", "/CN=bestshot test CA"],
                 ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
                 ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days",
                  "1", "-extfile", ext]):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


def test_tls_with_a_ca_and_a_token_and_an_nkey_seed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nkeys

    ca, cert, key = _certificates(tmp_path)
    tls_node = NatsNode(tmp_path / "tls", extra=f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
                                               'authorization { token: "a-token-for-the-edge-boxes" }').start()
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    (tmp_path / "edge.nk").write_bytes(seed)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    nkey_node = NatsNode(tmp_path / "nkey", extra=f"authorization {{ users: [ {{ nkey: {public} }} ] }}").start()
    monkeypatch.setenv("NATS_TOKEN", "a-token-for-the-edge-boxes")
    s = StreamSettings(max_bytes=64 * MiB)
    tls_url = tls_node.url.replace("nats://", "tls://")
    outputs = Outputs([
        NatsOutput(NatsConfig(name="tls", servers=[tls_url], tls_ca=ca, token=Secret(env="NATS_TOKEN"), stream=s)),
        NatsOutput(NatsConfig(name="untrusted", servers=[tls_url], token=Secret(env="NATS_TOKEN"), stream=s)),
        NatsOutput(NatsConfig(name="nkey", servers=[nkey_node.url], nkey_seed_file=tmp_path / "edge.nk", stream=s)),
    ])
    tls, untrusted, nkey = outputs.outputs
    try:
        assert outputs.publish(real_shot(1))
        wait_until("acked over TLS with the token and with the nkey",
                   lambda: tls.counts.acked == 1 and nkey.counts.acked == 1)
        wait_until("the unknown CA refused", lambda: "certificate" in untrusted.health()[1].get("reason", "").lower())
        assert untrusted.counts.acked == 0
    finally:
        outputs.close(1)
        tls_node.kill()
        nkey_node.kill()
