"""Reaching a backend: the connection parameters (address, CURVE keys, how long a restart may take) and the liveness
timing every client of the add-on uses. Every backend needs keys: a remote one the files its operator gave out, the
local one the `local` pair it made in the user's key folder on its first start (protocol/keys.py)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zmq.auth

from ..protocol import Client
from ..protocol.keys import client_secret_file, default_keys_dir, server_key_file
from .errors import AddonError

HEARTBEAT_S = 0.5  # ping interval while waiting for the backend
DEAD_AFTER_S = 3.0  # silence after which the backend counts as lost: a dead backend shows within ~3 s
RESUME_FOR_S = 120.0  # how long a lost remote backend may take to come back (a restart) before its job fails
ADDON_VERSION = tomllib.loads((Path(__file__).parents[1] / "blender_manifest.toml").read_text())["version"]

Say = Callable[[str], None]  # reports what a slow step is doing, for the progress line


@dataclass(frozen=True)
class Connection:
    address: str
    server_key: str = ""  # the server's public CURVE key: 40 characters of Z85, or the path of its server.key
    client_key_file: str = ""  # this client's NAME.key_secret from `python -m backend keys`; empty: none
    resume_for: float = RESUME_FOR_S  # seconds a job waits for a silent backend to come back

    @classmethod
    def local(cls, address: str) -> Connection:
        """The backend this add-on started: the local keypair, and no resume window (nobody restarts it behind a
        job's back; its death is reported at once, with its log)."""
        folder = default_keys_dir()
        return cls(address, str(server_key_file(folder)), str(client_secret_file(folder)), resume_for=0.0)

    def client(self, timeout: float | None = 10.0) -> Client:
        """A connected protocol Client, or AddonError for a bad address or key (never a raw ValueError)."""
        if not self.address.startswith(("tcp://", "ipc://")):
            raise AddonError(f"Backend address {self.address!r} is not a ZeroMQ address",
                             "Use tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555.")
        server_key, client_keys = self._keys()
        try:
            return Client(self.address, timeout=timeout, heartbeat_interval=HEARTBEAT_S, dead_after=DEAD_AFTER_S,
                          resume_for=self.resume_for, curve_server_key=server_key, curve_client_keys=client_keys,
                          client_name="blender", client_version=ADDON_VERSION)
        except ValueError as exc:
            raise AddonError(f"Cannot connect to {self.address}: {exc}",
                             "Check the address and the CURVE keys in the add-on's preferences.") from exc

    def _keys(self) -> tuple[bytes | None, tuple[bytes, bytes] | None]:
        """(server public key, (client public, client secret)) from the key text or files; (None, None): no CURVE."""
        hint = "Use the files written by `python -m backend keys`: server.key and client-secrets/NAME.key_secret."
        text = self.server_key.strip()
        server_key = _certificate(Path(text), hint)[0] if text and Path(text).is_file() else text.encode() or None
        if not self.client_key_file:
            return server_key, None
        if server_key is None:
            raise AddonError("A client key file is set but no server key", hint)
        public, secret = _certificate(Path(self.client_key_file), hint)
        if secret is None:
            raise AddonError(f"{self.client_key_file} holds no secret key", hint)
        return server_key, (public, secret)


def _certificate(path: Path, hint: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AddonError(f"Cannot read the CURVE key file {path}: {exc}", hint) from exc
