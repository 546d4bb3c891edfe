"""CurveZMQ for psq's sockets: key files, allow-lists, and the refusal of insecure binds.

Keys are ``zmq.auth`` certificate files (``psq keys generate DIR NAME`` writes ``NAME.key`` and
``NAME.key_secret``); flags and ``PSQ_*`` variables name files and folders, never keys.

* The broker holds a secret key and two allow-lists — folders of public-key files — one for
  workers (its frontend) and one for aggregators (its backend).  Each side is its own ZAP domain,
  so a worker's key does not open the aggregator side, and every refusal is logged with its
  reason.
* Workers and aggregators hold their own key pair and the broker's public key.

Without keys psq binds loopback addresses only: a non-loopback bind needs keys or ``--insecure``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from psq.config import SettingsError, is_loopback
from psq.logs import Throttled

log = logging.getLogger("psq.security")

WORKERS_DOMAIN = "workers"
AGGREGATORS_DOMAIN = "aggregators"


def generate(folder: Path, name: str) -> tuple[Path, Path]:
    """Write a key pair: ``NAME.key`` (public, to share) and ``NAME.key_secret`` (keep private)."""
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` certificate file, or a clear error."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read the secret key file {path}: {exc}") from None
    if not secret:
        raise SettingsError(f"{path} holds no secret key: pass the .key_secret file, not the public .key")
    return public, secret


def load_public(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read the public key file {path}: {exc}") from None
    return public


def allowed_keys(folder: Path) -> dict[bytes, str]:
    """The public keys in a folder of certificate files, z85 → file name."""
    if not folder.is_dir():
        raise SettingsError(f"allow-list {folder} is not a folder of public key files")
    return {zmq.auth.load_certificate(p)[0]: p.name for p in sorted(folder.glob("*.key"))}


@dataclass(frozen=True)
class ClientKeys:
    """A worker's or an aggregator's keys: its own pair and the broker's public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret_file: Path | None, server_file: Path | None) -> ClientKeys | None:
        if secret_file is None and server_file is None:
            return None
        if secret_file is None or server_file is None:
            raise SettingsError(
                "CurveZMQ needs both --secret-key (this side's .key_secret) and --server-key (the broker's public .key)"
            )
        public, secret = load_secret(secret_file)
        return cls(public, secret, load_public(server_file))

    def apply(self, sock: zmq.Socket) -> zmq.Socket:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.public, self.secret, self.server
        return sock


def check_bind(address: str, secured: bool, insecure: bool) -> None:
    """Refuse a non-loopback bind without keys, unless told ``--insecure``."""
    if secured or insecure or is_loopback(address):
        return
    raise SettingsError(
        f"refusing to bind {address} without CurveZMQ keys: anyone who can reach it could "
        "read and write statistics; pass --secret-key with --worker-keys and --aggregator-keys, "
        "or --insecure on a trusted network"
    )


HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_PROTOCOL_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the peer speaks another security mechanism (no CurveZMQ keys "
    "where they are required, or keys where none are expected)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "the peer's handshake does not decrypt: it uses a wrong server key",
    zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE: "the key exchange failed",
}


def handshake_failure(event: dict) -> str:
    """Why a handshake failed, from a socket monitor event, in words."""
    kind = event["event"]
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"its key is not allowed (ZAP status {event['value']})"
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        code = event["value"]
        return _PROTOCOL_REASONS.get(code, f"ZMTP protocol error {code:#x}")
    # libzmq reports a peer without keys this way too when a ZAP handler is installed
    return "the handshake failed before the peer proved a key: no CurveZMQ keys, or it hung up mid-handshake"


class BrokerAuth:
    """The broker's keys and allow-lists, enforced by a ZAP authenticator thread."""

    def __init__(
        self, secret_file: Path, worker_keys: Path, aggregator_keys: Path, refusals: Throttled | None = None
    ) -> None:
        self.public, self.secret = load_secret(secret_file)
        self.lists = {
            WORKERS_DOMAIN: (worker_keys, allowed_keys(worker_keys)),
            AGGREGATORS_DOMAIN: (aggregator_keys, allowed_keys(aggregator_keys)),
        }
        self._auth: ThreadAuthenticator | None = None
        self._refusals = refusals or Throttled(log)  # the broker's, which its tick flushes

    def start(self, ctx: zmq.Context) -> None:
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("psq.security.zap"))
        self._auth.start()
        for domain in self.lists:
            self._auth.configure_curve_callback(domain, credentials_provider=self)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()

    def serve(self, sock: zmq.Socket, domain: str) -> zmq.Socket:
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self.public, self.secret
        sock.zap_domain = domain.encode()
        return sock

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: is this z85 public key on the allow-list of ``domain``?  Logs every refusal."""
        folder, keys = self.lists[domain]
        if key in keys:
            return True
        elsewhere = [d for d, (_, k) in self.lists.items() if d != domain and key in k]
        if elsewhere:
            why = f"it is on the {elsewhere[0]} allow-list, not on the {domain} one"
        else:
            why = f"no key file in {folder} holds it"
        # keyed by the reason, not the key: a stranger can make a fresh key for every attempt
        self._refusals.warning(
            ("zap", domain, why), "broker: refused a connection to the %s side, key %s: %s", domain, key.decode(), why
        )
        return False
