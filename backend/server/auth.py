"""CURVE security: every connection is encrypted and its client authenticated, loopback included.

The key folder (layout in protocol/keys.py; default `~/.config/trellis2/keys`, owner-only):

    KEYS/server.key                  the server's public key: give it to every client
    KEYS/server.key_secret           the server's secret key: never leaves the server
    KEYS/clients/NAME.key            public keys of the clients let in (delete one to lock that client out)
    KEYS/client-secrets/NAME.key_secret
                                     a client's keypair: give it (with server.key) to that client only

A server bound to this machine only (127.0.0.0/8, ::1, localhost, ipc://) creates the folder on its first start,
with the client keypair `local` that `submit` and the add-on's local mode read, so only the user who owns the folder
can use the server. Bound anywhere else it refuses to start without a folder holding its keypair and at least one
client key (`python -m backend keys`). A folder other users can read is refused either way. pyzmq's
ThreadAuthenticator lets in only clients whose public key is in KEYS/clients/ (read at start: restart the server
after changing it); a refused client gets nothing at all, not even an error: ZeroMQ drops the handshake.
`--no-auth` (loopback only) turns all of this off for debugging.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol.keys import (CLIENT_SECRETS_DIR, CLIENTS_DIR, LOCAL_CLIENT, SERVER_NAME, client_secret_file,
                           default_keys_dir)

DEFAULT_CLIENT = "blender"
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class SecurityError(RuntimeError):
    """The server may not start as configured; the message says why and what to do."""


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    clients_dir: Path


def is_local(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: loopback TCP, ipc:// and inproc://."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", interface names, host names: reachable from outside
        return False


def server_keys_for(bind: str, keys_dir: Path | None, auth: bool = True) -> ServerKeys | None:
    """The CURVE keys the server must use on `bind` (None only with `auth` off, on a local bind). A local bind gets
    its key folder made on first start; any other raises SecurityError unless a usable key folder exists."""
    if not auth:
        if not is_local(bind):
            raise SecurityError(f"refusing to start: --no-auth is for loopback only, and {bind} is reachable from "
                                f"other machines")
        return None
    folder = keys_dir or default_keys_dir()
    if is_local(bind) and not (_server_secret(folder).is_file() and client_secret_file(folder).is_file()):
        make_keys(folder, LOCAL_CLIENT)
    _check_private(folder)
    secret_file, clients = _server_secret(folder), folder / CLIENTS_DIR
    why = ""
    if not secret_file.is_file():
        why = f"{secret_file} does not exist"
    elif not clients.is_dir() or not any(clients.glob("*.key")):
        why = f"{clients} holds no client public keys (*.key), so no client could connect"
    if why:
        raise SecurityError(
            f"refusing to start: {bind} is reachable from other machines, so the server needs CURVE encryption and "
            f"client keys, but {why}. Run `python -m backend keys --dir {folder}` and give clients server.key and "
            f"their client-secrets/NAME.key_secret, or bind to tcp://127.0.0.1:PORT for this machine only.")
    public, secret = zmq.auth.load_certificate(secret_file)
    if not secret:
        raise SecurityError(f"refusing to start: {secret_file} holds no secret key; recreate it with "
                            f"`python -m backend keys --dir {folder} --force`")
    return ServerKeys(public, secret, clients)


def _server_secret(folder: Path) -> Path:
    return folder / f"{SERVER_NAME}.key_secret"


def _check_private(folder: Path) -> None:
    """Refuse a key folder that is not this user's own (anyone who reads it can use, or impersonate, the server)."""
    if os.name != "posix" or not folder.is_dir():
        return
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"refusing to start: the key folder {folder} is not private to its owner (mode "
                            f"{stat.filemode(info.st_mode)}, owner uid {info.st_uid}); run `chmod 700 {folder}` as "
                            f"its owner, or recreate it with `python -m backend keys --dir {folder} --force`")


def secure_server_socket(ctx: zmq.Context, sock: zmq.Socket, keys: ServerKeys) -> ThreadAuthenticator:
    """Turn on CURVE for `sock` (before it binds) and start the authenticator that checks client keys."""
    authenticator = ThreadAuthenticator(ctx)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(keys.clients_dir))
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    return authenticator


def make_keys(folder: Path, client: str = DEFAULT_CLIENT, force: bool = False) -> list[Path]:
    """Create the server keypair (unless present) and a keypair for `client`; returns the files written.
    Existing keys are kept unless `force`, so running it again only adds clients."""
    if not _CLIENT_NAME.fullmatch(client) or client == SERVER_NAME:
        raise ValueError(f"client name must be 1-64 of A-Z a-z 0-9 _ . - and not {SERVER_NAME!r}, got {client!r}")
    written: list[Path] = []
    secrets = folder / CLIENT_SECRETS_DIR
    for path in (folder, folder / CLIENTS_DIR, secrets):
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    if force or not _server_secret(folder).exists():
        written += _new_keypair(folder, SERVER_NAME)
    if force or not (secrets / f"{client}.key_secret").exists():
        public, secret = _new_keypair(secrets, client)
        shutil.move(public, folder / CLIENTS_DIR / public.name)
        written += [folder / CLIENTS_DIR / public.name, secret]
    return written


def _new_keypair(folder: Path, name: str) -> list[Path]:
    public, secret = (Path(p) for p in zmq.auth.create_certificates(folder, name))
    os.chmod(secret, 0o600)
    return [public, secret]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("keys", help="create CURVE keys for a server reachable from other machines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=default_keys_dir(), help="key folder (default: %(default)s)")
    p.add_argument("--client", default=DEFAULT_CLIENT, help="name of the client keypair to add (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace existing keys (locks out every current client)")
    p.set_defaults(run=keys_command)


def keys_command(args: argparse.Namespace) -> int:
    try:
        written = make_keys(args.dir, args.client, args.force)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"keys for the server and client {args.client!r} exist already in {args.dir} (--force replaces them)")
    print(f"serve:  python -m backend serve --bind tcp://0.0.0.0:5555 --keys {args.dir}\n"
          f"client: python -m backend submit IMAGE --server tcp://HOST:5555 --server-key {args.dir}/server.key "
          f"--client-key {args.dir}/{CLIENT_SECRETS_DIR}/{args.client}.key_secret")
    return 0
