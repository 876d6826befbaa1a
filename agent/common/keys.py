"""CURVE key files for the publisher and its subscribers (the format of zmq.auth.create_certificates).

``NAME.key`` holds a public key (give it to the other side; a publisher's allow-list directory holds its clients'
``*.key`` files); ``NAME.key_secret`` holds the key pair and must stay private: readable by its owner only.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from pathlib import Path

import zmq
import zmq.auth

log = logging.getLogger(__name__)

_Z85_KEY_LEN = 40


class KeyFileError(ValueError):
    """A key file or directory that cannot be used (missing, unreadable, malformed, or readable by others)."""


def generate_keys(directory: str | Path, name: str = "bestshot") -> tuple[Path, Path]:
    """Write DIR/NAME.key (public) and DIR/NAME.key_secret (mode 0600) in DIR (created mode 0700, or tightened to it
    when it exists); refuses to overwrite existing keys. Returns (public_path, secret_path)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ValueError(f"key name {name!r}: use letters, digits, '_', '.', '-'")
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.chmod(0o700)  # the secret file is briefly created with the umask's mode: keep others out of the folder
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    if existing := [str(p) for p in (public, secret) if p.exists()]:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); remove it or choose another --name")
    zmq.auth.create_certificates(d, name)
    secret.chmod(0o600)
    public.chmod(0o644)
    log.info("wrote CURVE keys %s (public) and %s (secret, mode 0600)", public, secret)
    return public, secret


def _parse(path: Path, text: bytes) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a certificate's text (zmq.auth's format), checked for length."""
    keys: dict[bytes, bytes] = {}
    for line in text.splitlines():
        line = line.strip()
        for name in (b"public-key", b"secret-key"):
            if line.startswith(name) and b"=" in line:
                keys.setdefault(name, line.split(b"=", 1)[1].strip(b" \t'\""))
    public, secret = keys.get(b"public-key"), keys.get(b"secret-key")
    if public is None:
        raise KeyFileError(f"{path}: cannot read a CURVE key: no public key in the file")
    if any(k is not None and len(k) != _Z85_KEY_LEN for k in (public, secret)):
        raise KeyFileError(f"{path}: malformed CURVE key (expected {_Z85_KEY_LEN} Z85 characters)")
    return public, secret


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return _parse(path, path.read_bytes())
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read a CURVE key: {e.strerror or e}") from e


def check_secret_file(path: str | Path) -> tuple[bytes, bytes]:
    """Load a secret key file after checking that it is a regular file (not a symlink) that only its owner can read
    and that belongs to this process's user (or root). The file is opened once and the checks are made on that open
    file, so it cannot be swapped between check and read. Returns (public_key, secret_key); raises KeyFileError
    naming the file and the problem."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise KeyFileError(f"{path}: cannot read the secret key file: {why}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: the secret key is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise KeyFileError(f"{path}: the secret key file belongs to uid {st.st_uid}, not to this user "
                               f"(uid {os.geteuid()}) or root")
        # systemd's LoadCredential= hands the file over read-only through an ACL, which shows as group-read (0440):
        # that is still private to the service, so only there group read is allowed.
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        allowed = 0o040 if creds and path.resolve().parent == Path(creds).resolve() else 0
        if st.st_mode & 0o077 & ~allowed:
            raise KeyFileError(f"{path}: the secret key file is accessible by group or others (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}")
        public, secret = _parse(path, f.read(64 * 1024))
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret key (is it the public .key file?)")
    try:
        derived = zmq.curve_public(secret)
    except zmq.ZMQError as e:
        raise KeyFileError(f"{path}: invalid secret key: {e}") from e
    if derived != public:
        raise KeyFileError(f"{path}: the public key does not match the secret key")
    return public, secret


def load_public_key(path: str | Path) -> bytes:
    """The public key in a .key (or .key_secret) file; raises KeyFileError naming the file."""
    return _load(Path(path))[0]


class AllowList:
    """ZAP credentials provider (zmq.auth's `configure_curve_callback`): a client is admitted when its public key
    (Z85) is in the validated set, so the set that is logged is the set that is enforced."""

    def __init__(self, keys: frozenset[bytes] | set[bytes]):
        self.keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def load_authorized_keys(directory: str | Path) -> dict[bytes, bool]:
    """The public keys of every ``*.key`` file in an allow-list directory (the zmq.auth layout);
    raises KeyFileError naming the directory or the first bad file."""
    d = Path(directory)
    if not d.is_dir():
        raise KeyFileError(f"{d}: the authorized keys directory does not exist")
    return {load_public_key(p): True for p in sorted(d.glob("*.key"))}
