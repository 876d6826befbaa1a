"""A bounded on-disk FIFO of multipart messages, for best shots waiting for a consumer.

One file per message, ``<sequence>.msg`` (zero-padded, so the name order is the arrival order, also after a
restart), written atomically (temporary file, fsync, rename). Layout: magic ``BSS1``, frame count (u32 LE), then
per frame its length (u64 LE) and bytes. Above the size cap the oldest messages are deleted first, and counted.
Only the sequence numbers and sizes are kept in memory. A lock file keeps a second process off the same folder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"BSS1"
SUFFIX = ".msg"
_COUNT = struct.Struct("<I")
_LEN = struct.Struct("<Q")


class SpoolError(OSError):
    """The spool folder cannot be used (not writable, or held by another process)."""


def pack(parts: list[bytes]) -> bytes:
    return b"".join([MAGIC, _COUNT.pack(len(parts)), *(_LEN.pack(len(p)) + bytes(p) for p in parts)])


def unpack(blob: bytes) -> list[bytes]:
    """The frames of a packed message; ValueError when it is truncated or not one."""
    if blob[:4] != MAGIC or len(blob) < 8:
        raise ValueError("not a spooled message")
    (n,), pos, parts = _COUNT.unpack_from(blob, 4), 8, []
    for _ in range(n):
        if pos + _LEN.size > len(blob):
            raise ValueError("truncated")
        (size,), pos = _LEN.unpack_from(blob, pos), pos + _LEN.size
        if pos + size > len(blob):
            raise ValueError("truncated")
        parts.append(blob[pos:pos + size])
        pos += size
    if pos != len(blob):
        raise ValueError(f"{len(blob) - pos} trailing bytes")
    return parts


class Spool:
    """FIFO of messages in ``directory``, at most ``max_bytes`` of files. Not thread-safe.

    ``dropped``: messages deleted unsent (the oldest, to respect the cap; or unreadable ones); ``bytes``: the size
    of the files now held; ``len(spool)``: how many.
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"spool size cap {max_bytes} must be positive")
        self.dir, self.max_bytes = Path(directory), max_bytes
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise SpoolError(f"spool {self.dir}: {e.strerror}") from e
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock)
            raise SpoolError(f"spool {self.dir} is in use by another publisher") from e
        self.dropped = self.bytes = 0
        self._queue: deque[tuple[int, int]] = deque()  # (sequence, file size), oldest first
        for p in self.dir.glob(".*.tmp"):  # a write cut short by a crash
            p.unlink(missing_ok=True)
        # only names this class writes: 16 ASCII digits ("٣".isdigit() is true, and int() takes it)
        found = sorted((int(p.stem), p.stat().st_size) for p in self.dir.glob(f"*{SUFFIX}")
                       if re.fullmatch(r"[0-9]{16}", p.stem))
        self._queue.extend(found)
        self.bytes = sum(size for _, size in found)
        self._next = found[-1][0] + 1 if found else 0
        if found:
            log.info("spool %s: %d message(s) (%d bytes) left by a previous run", self.dir, len(found), self.bytes)
        self._trim(0)

    def __len__(self) -> int:
        return len(self._queue)

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:016d}{SUFFIX}"

    def _trim(self, room: int) -> None:
        """Delete the oldest messages until `room` more bytes fit under the cap."""
        while self._queue and self.bytes + room > self.max_bytes:
            self._remove()
            self.dropped += 1

    def _sync_dir(self) -> None:
        """Make the folder's entries (a rename, an unlink) durable, not only the files' contents."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove(self) -> None:
        seq, size = self._queue.popleft()
        self._path(seq).unlink(missing_ok=True)
        self._sync_dir()
        self.bytes -= size

    def put(self, parts: list[bytes]) -> bool:
        """Append a message, deleting the oldest ones if the cap requires; False (counted as dropped) when the
        message alone is larger than the cap. OSError (disk full, ...) propagates; nothing is left half-written."""
        blob = pack(parts)
        if len(blob) > self.max_bytes:
            self.dropped += 1
            return False
        self._trim(len(blob))
        seq, path = self._next, self._path(self._next)
        tmp = self.dir / f".{path.name}.tmp"
        try:
            with open(tmp, "wb", opener=lambda p, flags: os.open(p, flags, 0o600)) as f:  # biometric data
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._sync_dir()
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self._next += 1
        self._queue.append((seq, len(blob)))
        self.bytes += len(blob)
        return True

    def peek(self) -> list[bytes] | None:
        """The oldest message (unreadable ones are logged, deleted and counted as dropped), or None when empty."""
        while self._queue:
            path = self._path(self._queue[0][0])
            try:
                return unpack(path.read_bytes())
            except (OSError, ValueError) as e:
                log.error("spool: unreadable message %s deleted: %s", path, e)
                self._remove()
                self.dropped += 1
        return None

    def pop(self) -> None:
        """Delete the oldest message (once it has been sent)."""
        self._remove()

    def close(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1
