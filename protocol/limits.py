"""Size limits that keep a hostile or buggy peer from exhausting memory.

One `Limits` value is given to `encode`, `decode` and the socket setup. Both sides check: the
receiver to protect itself, the sender so the user gets a clear error naming the limit *before*
megabytes are pushed at a server that would drop them. The server advertises its limits in `Info`
and the client adopts them for what it sends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from .errors import MalformedMessage

KiB = 1 << 10
MiB = 1 << 20

Role = Literal["client", "server"]


@dataclass(frozen=True)
class Limits:
    """Every limit is a positive int; override any of them with `Limits(max_image_bytes=...)`."""

    max_message_bytes: int = 1024 * MiB  # all frames of one message together
    max_frame_bytes: int = 512 * MiB  # one frame; also zmq.MAXMSGSIZE on the client's socket
    max_header_bytes: int = 1 * MiB  # the msgpack header frame
    max_items: int = 100_000  # entries of any one list or map inside the header
    max_image_bytes: int = 64 * MiB  # encoded image file in a request
    max_mesh_bytes: int = 64 * MiB  # the mesh arrays of a texture request, all together (~1.5M faces)
    max_image_pixels: int = 8192 * 8192  # width * height declared by the image file's header
    max_arrays: int = 64  # binary frames (arrays, image) in one message
    max_array_elements: int = 1 << 28  # elements of one array
    max_array_ndim: int = 8  # dimensions of one array

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {value!r}")

    def below_peer_minimum(self) -> list[str]:
        """The fields under PEER_MINIMUM, as "name = value (minimum M)" texts; empty when every field is enough."""
        return [f"{name} = {getattr(self, name)} (minimum {minimum})" for name, minimum in PEER_MINIMUM.items()
                if getattr(self, name) < minimum]

    def inbound_frame_bytes(self, receiver: Role) -> int:
        """Largest frame `receiver` can legitimately get, for zmq.MAXMSGSIZE on its socket.

        A server only ever receives headers, images and a texture request's mesh arrays, so its socket refuses
        anything bigger and a hostile client cannot make it buffer a 512 MiB frame; a client receives result arrays.
        """
        if receiver == "server":
            return min(self.max_frame_bytes, max(self.max_header_bytes, self.max_image_bytes, self.max_mesh_bytes))
        return self.max_frame_bytes

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Limits:
        """Build from a peer's advertised limits (e.g. `Info.limits`); bad input is a ProtocolError."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise MalformedMessage(f"limits must be a map with exactly the keys {sorted(names)}, got {data!r:.200}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise MalformedMessage(str(exc)) from exc


DEFAULT_LIMITS = Limits()

# What a client must accept at least (checked in `hello`): enough for every reply a server sends besides a result
# (its `info` with the settings schema is ~10 KiB, an `error` ~3 KiB), so no client can make those replies
# unencodable. A result too large for a client's limits becomes an `error` that fits these.
PEER_MINIMUM = {"max_message_bytes": 64 * KiB, "max_frame_bytes": 64 * KiB, "max_header_bytes": 64 * KiB,
                "max_items": 1024}
