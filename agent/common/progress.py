"""A plain progress bar for long evaluations and preparations."""

from __future__ import annotations

import sys
import time


class Progress:
    """A plain progress bar on stderr: redrawn in place on a terminal, a line per 10 % otherwise."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.t0 = label, max(total, 1), 0, time.monotonic()
        self.tty, self.shown = sys.stderr.isatty(), -1

    def __call__(self, n: int = 1) -> None:
        self.done += n
        frac = min(self.done / self.total, 1.0)
        if self.tty:
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {time.monotonic() - self.t0:.0f}s")
        elif int(10 * frac) > self.shown:
            self.shown = int(10 * frac)
            sys.stderr.write(f"{self.label}: {self.done}/{self.total} ({time.monotonic() - self.t0:.0f}s)\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
