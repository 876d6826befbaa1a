"""Secrets an output needs (a NATS password or token, an MQTT password): named in the YAML, never written there;
and the TLS context a network output's client uses.

`Secret(env="NATS_PASSWORD")` reads an environment variable; `Secret(credential="nats-password")` reads that file in
`$CREDENTIALS_DIRECTORY`, where systemd puts what `LoadCredential=` names (readable only by the service).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Secret:
    env: str | None = None  # environment variable holding the secret
    credential: str | None = None  # file name in $CREDENTIALS_DIRECTORY (systemd LoadCredential=)

    def __post_init__(self) -> None:
        if (self.env is None) == (self.credential is None):
            raise ValueError("a secret names exactly one of `env` or `credential`")

    def read(self, what: str) -> str:
        """The secret's value, stripped; ValueError naming `what` and where it was looked for when it is missing."""
        if self.env is not None:
            value, where = os.environ.get(self.env, ""), f"environment variable {self.env}"
        else:
            folder = os.environ.get("CREDENTIALS_DIRECTORY")
            where = f"credential {self.credential!r}"
            if not folder:
                raise ValueError(f"{what}: {where}: $CREDENTIALS_DIRECTORY is not set (not started by systemd with "
                                 "LoadCredential=?)")
            try:
                value = (Path(folder) / self.credential).read_text()
            except OSError as e:
                raise ValueError(f"{what}: {where}: cannot read it: {e.strerror or e}") from e
        if not value.strip():
            raise ValueError(f"{what}: the {where} is unset or empty")
        return value.strip()


def client_tls(ca: Path | None, cert: Path | None, key: Path | None, what: str) -> ssl.SSLContext:
    """A client TLS context checking servers against `ca` (None: the system's CAs), with a client certificate when
    `cert` and `key` are given; ValueError naming `what` when a file cannot be used."""
    try:
        ctx = ssl.create_default_context(cafile=None if ca is None else str(ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert), None if key is None else str(key))
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"{what}: TLS files: {e}") from e
    return ctx
