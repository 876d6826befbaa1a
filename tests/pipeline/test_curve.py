"""CURVE on the publisher: key files, the allow-list, and who receives what (real sockets on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from test_publish import make_shot, run_subscriber, wait_first

from agent.cli.subscribe import subscribe
from agent.common.keys import KeyFileError, check_secret_file, generate_keys, load_public_key
from agent.pipeline.outputs.zeromq import Publisher, PublisherConfig, decode

pytestmark = pytest.mark.timeout(60)
CTX = zmq.Context.instance()


@dataclass
class Keys:
    server_public: Path
    server_secret: Path
    authorized: Path
    allowed: tuple[Path, Path]  # (public, secret); its public key is in `authorized`
    stranger: tuple[Path, Path]  # not in `authorized`

    def config(self, **kw) -> PublisherConfig:
        return PublisherConfig(endpoint="tcp://127.0.0.1:*", curve_secret_key=self.server_secret,
                               curve_authorized_keys_dir=self.authorized, linger_ms=0, **kw)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    server = generate_keys(tmp_path / "server", "server")
    allowed = generate_keys(tmp_path / "clients", "allowed")
    stranger = generate_keys(tmp_path / "clients", "stranger")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    shutil.copy(allowed[0], authorized)
    return Keys(*server, authorized, allowed, stranger)


def sub_socket(server_public: Path | None = None, client: tuple[Path, Path] | None = None) -> zmq.Socket:
    sock = CTX.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"bestshot.")
    sock.setsockopt(zmq.LINGER, 0)
    if client is not None:
        sock.curve_serverkey = load_public_key(server_public)
        sock.curve_publickey, sock.curve_secretkey = check_secret_file(client[1])
    return sock


def test_generate_keys(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    public, secret = generate_keys(d, "edge-1")
    assert (public, secret) == (d / "edge-1.key", d / "edge-1.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(d.stat().st_mode) == 0o700
    pub_key, sec_key = check_secret_file(secret)
    assert load_public_key(public) == pub_key == zmq.curve_public(sec_key) and b"secret-key" not in public.read_bytes()
    with pytest.raises(FileExistsError, match="edge-1.key"):
        generate_keys(d, "edge-1")  # never overwrites a key
    with pytest.raises(ValueError, match="key name"):
        generate_keys(d, "../x")


def test_allowed_client_receives_everything_others_nothing(keys: Keys) -> None:
    """One CURVE PUB, three subscribers: the allowed one gets N of N; a stranger and a plain-text one get nothing."""
    n = 30
    with Publisher(keys.config()) as pub:
        allowed = sub_socket(keys.server_public, keys.allowed)
        stranger = sub_socket(keys.server_public, keys.stranger)
        plain = sub_socket()
        try:
            for s in (allowed, stranger, plain):
                s.connect(pub.endpoint)
            wait_first(pub, allowed)  # the allowed client has completed its handshake and subscribed
            time.sleep(0.3)  # give the others as long to try theirs
            assert all(pub.publish(make_shot(track_id=i)) for i in range(n))
            got = [decode(allowed.recv_multipart()).meta["track_id"] for _ in range(n)]
            assert not stranger.poll(500) and not plain.poll(0)
        finally:
            for s in (allowed, stranger, plain):
                s.close()
    assert got == list(range(n))


@pytest.mark.parametrize("who", ["allowed", "stranger", "plain"])
def test_subscribe_with_curve_push(keys: Keys, who: str) -> None:
    """subscribe() with the client key options; in push mode a refused consumer is no peer at all: shots drop."""
    n = 10
    client = {"allowed": keys.allowed, "stranger": keys.stranger, "plain": None}[who]
    curve = {} if client is None else {"server_public_key": keys.server_public, "client_secret_key": client[1]}
    with Publisher(keys.config(mode="push")) as pub:
        # an allowed consumer stops at `n` (a generous idle limit covers a slow handshake); the others get nothing
        t, result = run_subscriber(endpoint=pub.endpoint, count=n, timeout_s=30 if who == "allowed" else 1.5,
                                   mode="pull", **curve)
        deadline = time.monotonic() + (10 if who == "allowed" else 1.0)
        i = 0
        while i < n and time.monotonic() < deadline:
            i += pub.publish(make_shot(track_id=i))
            time.sleep(0.005)
        t.join(40)
    assert not t.is_alive()
    if who == "allowed":
        assert result["n"] == n and pub.published == n
    else:
        assert result["n"] == 0 and pub.published == 0 and pub.dropped > 0


def test_reload_authorized_keys(keys: Keys) -> None:
    with Publisher(keys.config()) as pub:
        assert pub.reload_authorized_keys() == 1
        shutil.copy(keys.stranger[0], keys.authorized)
        assert pub.reload_authorized_keys() == 2
        late = sub_socket(keys.server_public, keys.stranger)
        try:
            late.connect(pub.endpoint)
            wait_first(pub, late)  # admitted now
        finally:
            late.close()
        (keys.authorized / "broken.key").write_text("no key here\n")
        with pytest.raises(KeyFileError, match="broken.key"):
            pub.reload_authorized_keys()  # the previous list stays in force


def test_bad_key_files_are_refused(keys: Keys, tmp_path: Path) -> None:
    keys.server_secret.chmod(0o644)
    with pytest.raises(KeyFileError, match=rf"{keys.server_secret}: .*accessible by group or others \(mode 0644\)"):
        Publisher(keys.config())
    keys.server_secret.chmod(0o640)
    with pytest.raises(KeyFileError, match="accessible by group or others"):
        Publisher(keys.config())
    keys.server_secret.chmod(0o600)

    def refused(match: str, **kw) -> None:
        cfg = keys.config()
        for k, v in kw.items():
            setattr(cfg, k, v)
        with pytest.raises(KeyFileError, match=match):
            Publisher(cfg)

    refused(r"missing.key_secret: cannot read the secret key file", curve_secret_key=tmp_path / "missing.key_secret")
    public_only = Path(shutil.copy(keys.server_public, tmp_path / "public-only.key_secret"))
    public_only.chmod(0o600)
    refused("holds no secret key", curve_secret_key=public_only)
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text('curve\n    public-key = "short"\n    secret-key = "short"\n')
    garbage.chmod(0o600)
    refused("garbage.key_secret: malformed CURVE key", curve_secret_key=garbage)
    mismatch = tmp_path / "mismatch.key_secret"
    mismatch.write_text(keys.server_secret.read_text().replace(
        load_public_key(keys.server_secret).decode(), load_public_key(keys.allowed[0]).decode()))
    mismatch.chmod(0o600)
    refused("does not match the secret key", curve_secret_key=mismatch)
    refused("authorized keys directory does not exist", curve_authorized_keys_dir=tmp_path / "nowhere")
    link = tmp_path / "link.key_secret"  # a symlink to a valid secret key: not followed
    link.symlink_to(keys.server_secret)
    refused("link.key_secret: cannot read the secret key file: it is a symbolic link", curve_secret_key=link)
    if os.geteuid() == 0:  # only root can give a file to another user (CI runs as root)
        foreign = Path(shutil.copy(keys.server_secret, tmp_path / "foreign.key_secret"))
        foreign.chmod(0o600)
        os.chown(foreign, 4242, 4242)
        refused(r"foreign.key_secret: the secret key file belongs to uid 4242", curve_secret_key=foreign)
    with pytest.raises(ValueError, match="both"):
        PublisherConfig(curve_secret_key=keys.server_secret)

    keys.allowed[1].chmod(0o644)
    with pytest.raises(KeyFileError, match="accessible by group or others"):
        subscribe("tcp://127.0.0.1:1", timeout_s=0.1, server_public_key=keys.server_public,
                  client_secret_key=keys.allowed[1])


def test_revoking_a_key_cuts_off_a_connected_subscriber(keys: Keys) -> None:
    """A connected subscriber kept receiving 5 of 5 after its key was deleted and the allow-list reloaded (ZAP
    checks only handshakes). Now the reload drops every connection: the revoked client gets nothing more, the
    one still allowed reconnects and gets the rest."""
    shutil.copy(keys.stranger[0], keys.authorized)  # both clients allowed at first
    with Publisher(keys.config()) as pub:
        kept = sub_socket(keys.server_public, keys.allowed)
        revoked = sub_socket(keys.server_public, keys.stranger)
        try:
            for s in (kept, revoked):
                s.connect(pub.endpoint)
            wait_first(pub, kept)
            wait_first(pub, revoked)
            (keys.authorized / keys.stranger[0].name).unlink()
            assert pub.reload_authorized_keys() == 1
            pub.pump()  # on the publisher's thread: the connections go
            while revoked.poll(0):  # anything sent before the revocation
                revoked.recv_multipart()
            deadline, got = time.monotonic() + 20, 0
            while got < 5 and time.monotonic() < deadline:  # until the allowed one is back and has 5 shots
                pub.publish(make_shot(track_id=1000))
                while kept.poll(50):
                    got += decode(kept.recv_multipart()).meta["track_id"] == 1000
            assert got >= 5
            assert not revoked.poll(300)  # the revoked one: nothing after the revocation
        finally:
            kept.close()
            revoked.close()
