"""ZeroMQ plumbing shared by the client and the server: socket options and ROUTER envelopes.

Envelope rule: every message on the wire is preceded by an empty delimiter frame, exactly like REQ
sockets do. A DEALER client sends [b"", *encode(msg)]; the server's ROUTER receives
[identity, b"", *frames] and replies with join_envelope(identity, encode(reply)). Because identities
are never empty, the first empty frame always separates routing from the message, also through
proxies that stack several identities.

Server sketch:

    sock = ctx.socket(zmq.ROUTER)
    configure_socket(sock, limits, "server")
    sock.bind("tcp://*:5555")
    identity, frames = split_envelope(sock.recv_multipart(copy=False))
    try:
        msg = decode(frames, limits, sender="client")
    except ProtocolError as exc:
        reply = Error.from_exception(exc)     # version_mismatch, limit_exceeded, malformed_message ...
    sock.send_multipart(join_envelope(identity, encode(reply, limits)), copy=False)
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import zmq

from .errors import MalformedMessage
from .limits import Limits, Role

F = TypeVar("F")


def configure_socket(sock: zmq.Socket, limits: Limits, role: Role) -> None:
    """Options every protocol socket needs: never block on close, refuse oversized frames."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.inbound_frame_bytes(role))


def split_envelope(frames: Sequence[F]) -> tuple[list[F], list[F]]:
    """(routing identity frames, message frames), split at the first empty frame."""
    for i, frame in enumerate(frames):
        if len(frame) == 0:
            return list(frames[:i]), list(frames[i + 1:])
    raise MalformedMessage("message lacks the empty delimiter frame before its header",
                           hint="send [b'', *encode(msg)] from DEALER sockets (REQ sockets add it themselves)")


def join_envelope(identity: Sequence[F], frames: Sequence[F]) -> list:
    """Frames to send on a ROUTER socket to the peer `identity` came from."""
    return [*identity, b"", *frames]
