"""systemd notifications (sd_notify(3), no libsystemd): READY, STATUS, RELOADING, STOPPING and a guarded WATCHDOG.

Every call is a no-op returning False outside systemd (no NOTIFY_SOCKET). The unit's NotifyAccess=main accepts
messages from any thread of the main process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send "KEY=value" fields to systemd in one datagram; True when sent."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), addr)
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", addr.replace("\0", "@"), e)
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def reloading() -> bool:
    """Before re-reading the configuration; send ready() when done (MONOTONIC_USEC: for Type=notify-reload)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_interval() -> float | None:
    """WatchdogSec= in seconds when systemd expects this process to ping, else None."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6


class Watchdog:
    """Sends WATCHDOG=1 every interval / 2 while `check()` returns no problems; with problems it stays silent (and
    logs them), so systemd restarts an agent whose loops hang. interval None: WATCHDOG_USEC (no thread without it)."""

    def __init__(self, check: Callable[[], list[str]], interval: float | None = None):
        self.check, self.interval = check, interval if interval is not None else watchdog_interval()
        self.pings = self.misses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.interval:
            log.info("systemd watchdog: pinging every %.1f s while the pipeline is alive", self.interval / 2)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval / 2):
            try:
                problems = self.check()
            except Exception as e:  # a broken check must not look like a healthy agent
                problems = [f"liveness check failed: {type(e).__name__}: {e}"]
            if problems:
                self.misses += 1
                log.error("systemd watchdog not pinged: %s", "; ".join(problems))
            elif notify("WATCHDOG=1"):
                self.pings += 1
