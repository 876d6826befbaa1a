"""Several outputs at once: the small `Output` protocol every transport follows, and `Outputs`, which fans out.

    pipeline --publish(shot)--> Outputs --submit(shot, shot_id)--> zeromq | nats | mqtt | ... (each its own state)

`submit` never blocks: an output either takes the shot into its own bounded queue (delivered from its own thread)
or sends it without waiting (ZeroMQ), or refuses it and counts it `dropped`. So a slow or dead output never holds
up the pipeline or another output. Every shot gets one `shot_id` here, the same for every output and kept through
retries, spooling and restarts: consumers de-duplicate on it (NATS uses it as the message id).

A new transport is a new file in this folder with a class that has `name`, `counts`, `submit`, `health` and
`close`; an output with work to do on the scoring thread between batches (the ZeroMQ spool pump) also has `tick`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

from agent.types import BestShot

log = logging.getLogger(__name__)


@dataclass
class Counts:
    """Per output: `published` shots handed to the transport (first attempt), `acked` confirmed by the server
    (NATS ack, MQTT PUBACK; ZeroMQ has none), `retried` further attempts, `spooled` written to the on-disk spool,
    `dropped` lost here (queue full, refused for good, spool write failed). Safe to update from several threads."""

    published: int = 0
    acked: int = 0
    retried: int = 0
    spooled: int = 0
    dropped: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, what: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + n)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


@runtime_checkable
class Output(Protocol):
    """One destination of best shots."""

    name: str  # unique among the outputs: the `output` label of its metrics and its key in /healthz
    counts: Counts

    def submit(self, shot: BestShot, shot_id: str) -> bool:
        """Take the shot without blocking; False when refused (then counted in `counts.dropped`)."""

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(delivering normally, details for /healthz: at least `reason` when not)."""

    def close(self, timeout_s: float) -> None:
        """Deliver what is queued for at most timeout_s; what is left goes to the spool where there is one."""


def new_shot_id() -> str:
    return uuid.uuid4().hex


class Outputs:
    """The fan-out: `publish(shot)` gives the shot, with a fresh shot id, to every output; True when at least one
    took it. `add()` registers one more output while the agent runs (thread-safe)."""

    def __init__(self, outputs: Iterable[Output] = ()):
        self._outputs: list[Output] = []
        self._lock = threading.Lock()
        for o in outputs:
            self.add(o)

    @property
    def outputs(self) -> list[Output]:
        with self._lock:
            return list(self._outputs)

    def add(self, output: Output) -> None:
        with self._lock:
            if any(o.name == output.name for o in self._outputs):
                raise ValueError(f"an output named {output.name!r} is already registered")
            self._outputs.append(output)

    def publish(self, shot: BestShot) -> bool:
        shot_id = new_shot_id()
        taken = False
        for o in self.outputs:
            try:
                taken |= o.submit(shot, shot_id)
            except Exception:  # one broken output must not cost the others this shot
                log.exception("output %s: shot of camera %s track %d not taken", o.name, shot.camera, shot.track_id)
                o.counts.add("dropped")
        return taken

    def tick(self) -> None:
        """Work the outputs do on the caller's thread between batches (ZeroMQ: the spool pump)."""
        for o in self.outputs:
            if (tick := getattr(o, "tick", None)) is not None:
                tick()

    def describe(self) -> str:
        """Where shots go, for logs and the service status: each output's endpoint (or name)."""
        return ", ".join(str(getattr(o, "endpoint", o.name)) for o in self.outputs) or "no output"

    @property
    def published(self) -> int:
        return sum(o.counts.published for o in self.outputs)

    @property
    def dropped(self) -> int:
        return sum(o.counts.dropped for o in self.outputs)

    def health(self) -> dict[str, dict[str, Any]]:
        out = {}
        for o in self.outputs:
            ok, details = o.health()
            out[o.name] = {"ok": ok, **details, **o.counts.as_dict()}
        return out

    def close(self, timeout_s: float) -> None:
        """Close every output, each given at most timeout_s (they close one after the other)."""
        for o in self.outputs:
            try:
                o.close(timeout_s)
            except Exception:
                log.exception("output %s: close failed", o.name)
