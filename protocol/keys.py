"""Where CURVE keys live, for every program that reaches a backend: one layout, read here, written by the backend.

    KEYS/server.key                      the server's public key: every client needs it
    KEYS/server.key_secret               the server's secret key: never leaves the server
    KEYS/clients/NAME.key                public keys of the clients let in (delete one to lock that client out)
    KEYS/client-secrets/NAME.key_secret  a client's keypair: give it (with server.key) to that client only

`KEYS` defaults to `$XDG_CONFIG_HOME/trellis2/keys` (`~/.config/trellis2/keys`), a folder only its owner may read.
A backend serving this machine creates it on first start with the client keypair `local`, which `submit` and the
Blender add-on's local mode read from here; `python -m backend keys` adds keypairs for other machines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zmq.auth

SERVER_NAME = "server"
CLIENTS_DIR = "clients"
CLIENT_SECRETS_DIR = "client-secrets"
LOCAL_CLIENT = "local"  # the keypair of the programs on the server's own machine


def default_keys_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "trellis2" / "keys"


def server_key_file(folder: Path) -> Path:
    return folder / f"{SERVER_NAME}.key"


def client_secret_file(folder: Path, client: str = LOCAL_CLIENT) -> Path:
    return folder / CLIENT_SECRETS_DIR / f"{client}.key_secret"


def client_curve(server_key: Path, client_secret: Path) -> dict[str, Any]:
    """`protocol.Client` keyword arguments from a server.key and a NAME.key_secret file; ValueError (naming the
    file) when one is missing, unreadable or holds no secret where one is due."""
    try:
        server_public, _ = zmq.auth.load_certificate(server_key)
        public, secret = zmq.auth.load_certificate(client_secret)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE key files {server_key} and {client_secret}: {exc}") from exc
    if not secret:
        raise ValueError(f"{client_secret} holds no secret key (use the .key_secret file)")
    return {"curve_server_key": server_public, "curve_client_keys": (public, secret)}


def local_client_curve(folder: Path | None = None) -> dict[str, Any] | None:
    """The `local` client's keyword arguments for a backend on this machine, or None while the backend has not
    created them yet (it does on its first start)."""
    folder = folder or default_keys_dir()
    server, secret = server_key_file(folder), client_secret_file(folder)
    if not (server.is_file() and secret.is_file()):
        return None
    return client_curve(server, secret)
