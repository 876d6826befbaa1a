"""Whether an output would send faces off this machine in clear: the one rule every output follows.

Best shots are biometric data. An output whose address can be reached from another machine (anything but a loopback
address, `localhost`, ipc:// or inproc://) must encrypt (CURVE for ZeroMQ, TLS for a network output); the
configuration refuses it otherwise, unless that output's `allow_plaintext` says so explicitly.

Names are not resolved: a host or interface name other than `localhost` counts as reachable (a machine's own name may
resolve to its LAN address, and the answer must not depend on DNS at the time of the check). `*` and `0.0.0.0` are
every interface.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOCAL_SCHEMES = frozenset({"ipc", "inproc"})


def is_local(address: str) -> bool:
    """True when `address` (tcp://HOST:PORT, ipc://PATH, inproc://NAME, or any scheme://HOST:PORT) cannot be reached
    from another machine."""
    parts = urlsplit(address)
    if parts.scheme.lower() in LOCAL_SCHEMES:
        return True
    host = parts.hostname or ""  # lower case, without the brackets of [::1]
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host or interface name, `*`, or nothing
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def in_clear(address: str, encrypted: bool) -> bool:
    """True when faces sent to `address` would cross the network unencrypted."""
    return not encrypted and not is_local(address)
