"""Memory bounded per client on the shared server: endings wait for a client's send budget and repeats are
coalesced, what a client leaves behind is let go, routing junk and oversized settings are never kept, and `info`
shows the server's memory. The byte counts are the server's own bookkeeping of what libzmq still holds for a client
(peers.py), which is exact, unlike the test process's RSS (shared with the client)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from protocol import Error, ErrorCode, Fetch, Generate, Hello, Info, RemoteError, Result, encode
from protocol.settings import GENERATE
from server_testkit import RawPeer, connect, local_keys, png, wait_until

@pytest.fixture(scope="module")
def results(server) -> list[str]:
    """Two finished jobs of the local client, put in the store directly: 16 MiB results, more than the loopback TCP
    buffers hold, sent as tracked zero-copy frames."""
    owner = local_keys()["curve_client_keys"][0].decode()
    jobs = []
    for seed in range(2):
        job_id = f"memory-test-{seed}"
        server.store.create(job_id, GENERATE, {}, owner=owner)
        texture = np.random.default_rng(seed).integers(0, 255, (2048, 2048, 4), dtype=np.uint8)
        server.store.finish(job_id, Result(job_id, textures={"base_color": texture}))
        jobs.append(job_id)
    return jobs


@pytest.fixture
def budget(server):
    """A send budget of 1 byte for the test: every second ending to a client waits for the first to be sent."""
    config = server.config
    server.config = replace(config, send_budget_bytes=1)
    yield
    server.config = config


def stalled_peer(server, identity: bytes) -> RawPeer:
    peer = RawPeer(server.endpoint, identity=identity, stalled=True)
    peer.send(Hello("stalled", "1"))
    wait_until(lambda: server._peers.get(identity) is not None, 10, "the hello")
    return peer


def test_repeated_fetches_of_a_result_a_client_does_not_read_are_coalesced(server, results):
    peer = stalled_peer(server, b"stalled-fetcher")
    try:
        for _ in range(150):
            peer.send(Fetch(results[0]))
        state = server._peers.get(b"stalled-fetcher")
        wait_until(lambda: state.sending, 10, "the first ending to go out")
        assert len(state.sending) == 1 and not state.outbox, "149 of the 150 fetches were coalesced"
        assert 0 < state.in_flight() <= 16 << 20, "what the server holds for it is one result at most"
    finally:
        peer.close()
    wait_until(lambda: state.in_flight() == 0, 10, "libzmq to let go of what the departed client left")


def test_endings_beyond_the_send_budget_wait_by_job_id_and_go_when_their_turn_comes(server, results, budget):
    peer = stalled_peer(server, b"stalled-budget")
    try:
        for job_id in results:
            peer.send(Fetch(job_id))
        state = server._peers.get(b"stalled-budget")
        # The stalled client's libzmq takes what its queue holds (its `info`, maybe a result); the next result sticks
        # in the TCP buffers, in flight, and spends the budget: the rest wait by id.
        wait_until(lambda: state.outbox, 10, "an ending to wait")
        waiting = list(state.outbox)
        assert len(state.sending) == 1 and waiting == results[-len(waiting):]
        got = []
        while len(got) < len(results) and (msg := peer.recv(15)) is not None:
            if not isinstance(msg, Info):
                got.append(msg.job_id)
        assert got == results, "each ending in turn, once the client reads"
    finally:
        peer.close()
    assert not state.outbox


def test_a_client_that_leaves_with_endings_waiting_costs_nothing_after(server, results, budget):
    peer = stalled_peer(server, b"stalled-leaver")
    for job_id in results:
        peer.send(Fetch(job_id))
    state = server._peers.get(b"stalled-leaver")
    wait_until(lambda: state.outbox, 10, "an ending to wait")
    peer.close()
    wait_until(lambda: server._peers.get(b"stalled-leaver") is None, 15, "the server to forget the client")
    assert state.in_flight() == 0


def test_routing_frames_before_a_message_are_refused_and_not_kept(server):
    peer = RawPeer(server.endpoint, identity=b"junk-router")
    try:
        peer.send_frames([b"x" * (4 << 20), b"", *encode(Hello("junk", "1"))])
        reply = peer.recv()
        assert isinstance(reply, Error) and reply.code == ErrorCode.MALFORMED_MESSAGE and "routing" in reply.message
        assert server._peers.get(b"junk-router") is None
        assert all(len(route) <= 255 for route, _ in server._peers.items())
    finally:
        peer.close()


def test_huge_settings_are_refused_and_never_stored(server):
    with connect(server.endpoint) as client:
        client.hello()
        jobs, size = len(server.store), server.store.total_bytes()
        with pytest.raises(RemoteError) as refused:
            client.submit(Generate(png(), {f"setting_{i}": i for i in range(60_000)}))
    assert refused.value.code == ErrorCode.INVALID_SETTINGS and len(refused.value.message) < 400
    assert (len(server.store), server.store.total_bytes()) == (jobs, size)


def test_info_shows_the_servers_memory(server):
    with connect(server.endpoint) as client:
        info = client.hello()
    assert isinstance(info, Info)
    memory = info.details["memory"]
    assert memory["rss_bytes"] > 10 << 20 and memory["sending_bytes"] >= 0 and memory["clients"] >= 1
