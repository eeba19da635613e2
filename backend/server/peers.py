"""What the server keeps per connection and per job, bounded whatever clients do: each connection's hello, identity
and send budget (the `Peers` registry), and who follows which job (`Subscriptions`).

A connection is its ROUTER identity (libzmq makes it, 5 bytes). Jobs belong to their owner (the client's CURVE key),
not to a connection: any connection of the owner may follow a job, and every follower gets its events. The registry
forgets the least recently heard connection beyond its size; such a client's next pong says it is not greeted, so it
greets again and fetches its jobs (protocol/client.py).

Send budget: a job's ending (a result can be hundreds of MiB) goes out zero-copy, and libzmq holds its buffers until
the bytes are on the wire, so a client that does not read would pin every result it asks for. Endings are therefore
sent to a connection only while less than `budget` bytes of earlier ones are still in flight (tracked per frame);
the others wait by job id in its outbox (loaded from the store when their turn comes), and asking again for an
ending already waiting or in flight is coalesced into that one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import zmq

from protocol import DEFAULT_LIMITS, Limits

MAX_PEERS = 4096  # connections remembered
MAX_OUTBOX = 256  # endings waiting for one connection's send budget; more are dropped (it is not reading)
MAX_SUBSCRIBERS = 16  # connections following one job; the earliest is dropped for a new one


@dataclass
class InFlight:
    job_id: str | None
    nbytes: int
    trackers: list[zmq.MessageTracker]

    @property
    def done(self) -> bool:
        return all(t.done for t in self.trackers)


@dataclass
class Peer:
    limits: Limits = DEFAULT_LIMITS  # what its hello said it accepts
    owner: str = ""  # its CURVE public key (Z85), "" without authentication
    greeted: bool = False  # its hello arrived on this connection
    sending: list[InFlight] = field(default_factory=list)
    outbox: dict[str, None] = field(default_factory=dict)  # job ids whose ending waits for the budget, in order

    def in_flight(self) -> int:
        """Bytes of zero-copy frames libzmq still holds for this connection."""
        self.sending = [s for s in self.sending if not s.done]
        return sum(s.nbytes for s in self.sending)

    def has_ending(self, job_id: str) -> bool:
        """The ending of `job_id` is waiting or still on its way to this connection: asking again is coalesced."""
        return job_id in self.outbox or any(s.job_id == job_id for s in self.sending if not s.done)


class Peers:
    """Connections by identity, least recently heard first; at most MAX_PEERS."""

    def __init__(self) -> None:
        self._peers: OrderedDict[bytes, Peer] = OrderedDict()

    def get(self, route: bytes) -> Peer | None:
        return self._peers.get(route)

    def heard(self, route: bytes) -> Peer:
        """The connection's entry (made if new), now the most recently heard."""
        peer = self._peers.get(route)
        if peer is None:
            peer = self._peers[route] = Peer()
            while len(self._peers) > MAX_PEERS:
                self._peers.popitem(last=False)
        self._peers.move_to_end(route)
        return peer

    def forget(self, route: bytes) -> None:
        self._peers.pop(route, None)

    def items(self) -> list[tuple[bytes, Peer]]:
        return list(self._peers.items())

    def __len__(self) -> int:
        return len(self._peers)

    def in_flight(self) -> int:
        return sum(peer.in_flight() for peer in self._peers.values())


class Subscriptions:
    """Which connections follow which job (at most MAX_SUBSCRIBERS each)."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[bytes, None]] = {}

    def add(self, job_id: str, route: bytes) -> None:
        routes = self._routes.setdefault(job_id, {})
        routes.pop(route, None)
        routes[route] = None
        while len(routes) > MAX_SUBSCRIBERS:
            del routes[next(iter(routes))]

    def of(self, job_id: str) -> list[bytes]:
        return list(self._routes.get(job_id, ()))

    def end(self, job_id: str) -> list[bytes]:
        """The job's followers, forgotten: its ending is being delivered."""
        return list(self._routes.pop(job_id, ()))

    def drop_route(self, route: bytes) -> None:
        for routes in self._routes.values():
            routes.pop(route, None)

    def __contains__(self, job_id: str) -> bool:
        return bool(self._routes.get(job_id))
