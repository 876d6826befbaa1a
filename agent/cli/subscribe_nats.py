"""`bestshot subscribe nats://...`: a durable JetStream pull consumer that acknowledges a shot only once it is handled.

At-least-once: a shot is acked after its files are written (with --out) and its JSON line printed; a consumer that
dies before that gets it again (after the consumer's ack_wait). Handling the same shot id twice is idempotent: ids
seen in this run, and with --out a shot whose metadata file already holds that id, are acked and skipped (counted
as duplicates). The durable consumer keeps the position across restarts of this command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig

from agent.cli.subscribe import _stdout_line, meta_path, save
from agent.common.secrets import client_tls
from agent.pipeline.outputs.nats import decode_body
from agent.pipeline.outputs.zeromq import Message

log = logging.getLogger(__name__)

SEEN_IDS = 100_000  # shot ids remembered in memory for de-duplication
# What JetStream answers while it cannot serve yet: a cluster electing a leader (timeouts, 503) or, for good, a
# server without JetStream (no responders); retried for `setup_timeout_s`, since the two look alike at first.
NOT_READY = (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError)


class JetStreamUnavailable(OSError):
    """The consumer could not be set up: no JetStream answered within `setup_timeout_s`."""


@dataclass
class NatsConsumer:
    """Which consumer to use: `durable` on `stream`, filtered to `subjects`; `ack_wait_s` before an unacked shot
    is delivered again. Connection options as the NATS output takes them (TLS CA, .creds, nkey seed)."""

    url: str = "nats://127.0.0.1:4222"  # nats://[user:password@]host:port, several separated by commas
    stream: str = "BESTSHOT"
    durable: str = "bestshot-subscribe"
    subjects: str = "bestshot.>"
    ack_wait_s: float = 30.0
    batch: int = 32
    tls_ca: Path | None = None
    creds_file: Path | None = None
    nkey_seed_file: Path | None = None
    token: str | None = None
    setup_timeout_s: float = 60.0  # how long the consumer's set-up is retried while JetStream is not ready


@dataclass
class ConsumeStats:
    handled: int = 0  # new shots (printed, and saved with --out)
    duplicates: int = 0  # shot ids already handled: acked, skipped
    redelivered: int = 0  # messages the stream delivered more than once (a consumer died or was late to ack)
    corrupt: int = 0  # messages that are no shot: terminated (never delivered again)


def _already_saved(meta: dict, out_dir: Path) -> bool:
    try:
        return json.loads(meta_path(meta, out_dir).read_text()).get("shot_id") == meta.get("shot_id")
    except (OSError, ValueError):
        return False


def _options(c: NatsConsumer) -> dict[str, Any]:
    opts: dict[str, Any] = {"servers": c.url.split(","), "name": f"bestshot subscribe {c.durable}",
                            "max_reconnect_attempts": 120, "reconnect_time_wait": 0.5}  # then: exit 1
    if c.tls_ca is not None:
        opts["tls"] = client_tls(c.tls_ca, None, None, "--tls-ca")
    if c.creds_file is not None:
        opts["user_credentials"] = str(c.creds_file)
    if c.nkey_seed_file is not None:
        opts["nkeys_seed"] = str(c.nkey_seed_file)
    if c.token is not None:
        opts["token"] = c.token
    return opts


async def _consume(c: NatsConsumer, out_dir: Path | None, count: int | None, timeout_s: float | None,
                   write_line: Callable[[str], None], stats: ConsumeStats,
                   on_message: Callable[[Message], None] | None) -> None:
    async def on_error(e: Exception) -> None:
        log.warning("%s: %s: %s", c.url, type(e).__name__, e)

    nc = await nats.connect(**_options(c), error_cb=on_error)
    try:
        sub = await _pull_subscription(nc.jetstream(), c)
        log.info("receiving best shots from stream %s (durable consumer %s, %s) on %s", c.stream, c.durable,
                 c.subjects, c.url)
        seen: OrderedDict[str, None] = OrderedDict()
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        while count is None or stats.handled < count:
            wait = min(1.0, deadline - time.monotonic())
            if wait <= 0:
                log.info("%s: nothing for %.1f s, stopping", c.url, timeout_s)
                break
            want = c.batch if count is None else min(c.batch, count - stats.handled)
            try:
                msgs = await sub.fetch(want, timeout=max(wait, 0.1))
            except (TimeoutError, asyncio.TimeoutError):  # nats-py raises either (asyncio's one since 2.12 when
                continue  # its deadline ran out between requests); one class on 3.11, two on 3.10
            if timeout_s is not None:
                deadline = time.monotonic() + timeout_s
            for m in msgs:
                await _handle(m, out_dir, write_line, stats, seen, on_message)
        await nc.flush(5)
    finally:
        await nc.close()


async def _pull_subscription(js: Any, c: NatsConsumer) -> Any:
    """The durable pull consumer, its set-up retried every second for `setup_timeout_s` while JetStream is not
    ready."""
    deadline = time.monotonic() + c.setup_timeout_s
    while True:
        try:
            return await js.pull_subscribe(c.subjects, durable=c.durable, stream=c.stream,
                                           config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                                 ack_wait=c.ack_wait_s, max_deliver=-1))
        except NOT_READY as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JetStreamUnavailable(
                    f"JetStream did not answer for {c.setup_timeout_s:g} s ({type(e).__name__}): is it enabled on the "
                    "server, and does its cluster have a quorum of nodes up?") from e
            log.warning("%s: JetStream not ready (%s: %s); retrying for %.0f s more", c.url, type(e).__name__, e,
                        left)
            await asyncio.sleep(min(1.0, left))


async def _handle(m: Any, out_dir: Path | None, write_line: Callable[[str], None], stats: ConsumeStats,
                  seen: OrderedDict[str, None], on_message: Callable[[Message], None] | None) -> None:
    delivered = m.metadata.num_delivered
    stats.redelivered += delivered > 1
    try:
        msg = decode_body(m.data)
    except ValueError as e:
        log.error("%s (stream seq %d): corrupt message terminated: %s", m.subject, m.metadata.sequence.stream, e)
        stats.corrupt += 1
        await m.term()
        return
    shot_id = msg.meta.get("shot_id")
    if shot_id in seen or (out_dir is not None and shot_id and _already_saved(msg.meta, out_dir)):
        stats.duplicates += 1
        await m.ack()
        return
    line = {**msg.meta, "nats": {"subject": m.subject, "stream_seq": m.metadata.sequence.stream,
                                 "delivered": delivered}}
    if out_dir is not None:
        try:
            line["files"] = save(msg, out_dir)
        except (OSError, KeyError, TypeError) as e:  # not acked: delivered again after ack_wait
            log.error("%s: shot %s not saved (delivered again later): %s", m.subject, shot_id, e)
            await m.nak(delay=5.0)
            return
    write_line(json.dumps(line))
    if on_message is not None:
        on_message(msg)
    stats.handled += 1
    if shot_id:
        seen[shot_id] = None
        if len(seen) > SEEN_IDS:
            seen.popitem(last=False)
    await m.ack()


def subscribe_nats(consumer: NatsConsumer, out_dir: Path | None = None, count: int | None = None,
                   timeout_s: float | None = None, write_line: Callable[[str], None] = _stdout_line,
                   on_message: Callable[[Message], None] | None = None) -> ConsumeStats:
    """Handle shots until `count` new ones arrived, `timeout_s` passed without any message, or Ctrl-C.
    on_message: also given each new shot (the live page's LiveView.add, `subscribe --view`)."""
    stats = ConsumeStats()
    try:
        asyncio.run(_consume(consumer, out_dir, count, timeout_s, write_line, stats, on_message))
    except KeyboardInterrupt:
        log.info("%s: interrupted after %d shot(s)", consumer.url, stats.handled)
    except (nats.errors.Error, OSError) as e:
        raise OSError(f"{consumer.url}: {type(e).__name__}: {e}") from e
    log.info("%s: %d shot(s), %d duplicate(s) skipped, %d redelivered, %d corrupt", consumer.url, stats.handled,
             stats.duplicates, stats.redelivered, stats.corrupt)
    return stats
