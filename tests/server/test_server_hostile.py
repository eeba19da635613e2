"""Hostile, malformed, oversized and wrong-version messages against the shared server: each gets a clear error
(or, for frames beyond the socket's size limit, a dropped connection), and the server goes on serving."""

from __future__ import annotations

import random

import msgpack
import pytest

from backend.server.server import ServerConfig
from protocol import (PROTOCOL_VERSION, Cancel, Error, ErrorCode, Fetch, Hello, Info, Limits, Ping, Pong, Result,
                      encode)
from protocol.keys import local_client_curve
from protocol.limits import PEER_MINIMUM
from server_testkit import RawPeer, connect, png, serve_in_thread, stop_served


def header(kind: str, body: dict, v: int = PROTOCOL_VERSION, frames: list | None = None) -> bytes:
    return msgpack.packb({"v": v, "type": kind, "body": body, "frames": frames or []})


GENERATE_BODY = {"settings": {}, "client_job_id": None}
IMAGE_FRAME = [{"frame": 1, "field": "image"}]


@pytest.fixture
def peer(server):
    peer = RawPeer(server.endpoint)
    yield peer
    peer.close()


def assert_alive(peer: RawPeer) -> None:
    peer.send(Ping(77))
    reply = peer.recv()
    assert isinstance(reply, Pong) and reply.seq == 77


@pytest.mark.parametrize("frames, code", [
    ([b"no delimiter frame"], ErrorCode.MALFORMED_MESSAGE),
    ([b"", b"\xc1 is never msgpack"], ErrorCode.MALFORMED_MESSAGE),
    ([b"", msgpack.packb([1, 2, 3])], ErrorCode.MALFORMED_MESSAGE),
    ([b"", header("launch", {})], ErrorCode.MALFORMED_MESSAGE),
    ([b"", header("ping", {"seq": "1"})], ErrorCode.MALFORMED_MESSAGE),
    ([b"", header("ping", {"seq": 1, "extra": 2})], ErrorCode.MALFORMED_MESSAGE),
    ([b"", header("pong", {"seq": 1})], ErrorCode.MALFORMED_MESSAGE),  # a server's message, from a client
    ([b"", header("result", {"job_id": "x", "metadata": {}})], ErrorCode.MALFORMED_MESSAGE),
    ([b"", header("generate", GENERATE_BODY, frames=IMAGE_FRAME), b"not an image at all"], ErrorCode.INVALID_IMAGE),
    ([b"", header("generate", GENERATE_BODY, frames=IMAGE_FRAME)], ErrorCode.MALFORMED_MESSAGE),  # frame missing
    ([b"", header("generate", {"settings": {"a": [[[[[[[[[1]]]]]]]]]}, "client_job_id": None}, frames=IMAGE_FRAME),
      png()], ErrorCode.MALFORMED_MESSAGE),  # nested too deep
    ([b"", header("fetch", {"job_id": "../../etc/passwd"})], ErrorCode.MALFORMED_MESSAGE),
    ([b"", header("ping", {"seq": 1}, v=99)], ErrorCode.VERSION_MISMATCH),
    ([b"", bytes((1 << 20) + 1)], ErrorCode.LIMIT_EXCEEDED),  # a header beyond max_header_bytes
    ([b"", header("ping", {"seq": 1}), *[b"x"] * 65], ErrorCode.LIMIT_EXCEEDED),  # more frames than max_arrays
])
def test_bad_messages_get_a_clear_error_and_the_server_goes_on(peer, frames, code):
    peer.send_frames(frames)
    reply = peer.recv()
    assert isinstance(reply, Error) and reply.code == code and reply.job_id is None and reply.hint
    assert_alive(peer)


def test_wrong_protocol_version_names_both_versions(peer):
    peer.send_frames([b"", header("hello", {"client": "old", "client_version": "0"}, v=PROTOCOL_VERSION + 1)])
    reply = peer.recv()
    assert isinstance(reply, Error) and reply.code == ErrorCode.VERSION_MISMATCH
    assert str(PROTOCOL_VERSION) in reply.message and str(PROTOCOL_VERSION + 1) in reply.message


def test_an_oversized_frame_costs_only_that_connection(server, peer):
    too_big = server.config.limits.max_image_bytes + 1  # beyond the server socket's MAXMSGSIZE
    peer.send_frames([b"", header("generate", GENERATE_BODY, frames=IMAGE_FRAME), bytes(too_big)])
    assert peer.recv(timeout=1.0) is None, "libzmq drops such a peer without reading the frame"
    with connect(server.endpoint) as client:
        assert isinstance(client.hello(), Info)
    assert_alive(peer)  # the DEALER reconnects by itself


def test_fuzzed_messages_never_stop_the_server(server, peer):
    rng = random.Random(6)
    seeds = [encode(m) for m in (Ping(1), Hello("fuzz", "1"), Fetch("some-job"), Cancel("other-job"))]
    for _ in range(300):
        frames = [bytearray(f) for f in rng.choice(seeds)]
        for _ in range(rng.randint(1, 6)):
            target = rng.choice(frames)
            if target:
                target[rng.randrange(len(target))] = rng.randrange(256)
        if rng.random() < 0.2:
            frames[0] = frames[0][:rng.randrange(len(frames[0]) + 1)]
        peer.send_frames([b"", *map(bytes, frames)])
    replies = 0
    while peer.recv(timeout=2.0) is not None:
        replies += 1
    assert replies == 300, "every message gets an answer: info, pong, or an error (no limits can prevent one)"
    assert_alive(peer)
    with connect(server.endpoint) as client:
        assert isinstance(client.hello(), Info)


def test_a_client_cannot_go_under_the_minimum_limits_to_end_the_server(server, peer):
    tiny = Limits().to_dict() | {"max_header_bytes": 16}
    peer.send_frames([b"", header("hello", {"client": "evil", "client_version": "1", "limits": tiny})])
    refused = peer.recv()
    assert isinstance(refused, Error) and refused.code == ErrorCode.MALFORMED_MESSAGE
    assert "max_header_bytes = 16" in refused.message and "minimum" in refused.hint
    least = Limits(**PEER_MINIMUM)
    peer.send(Hello("frugal", "1", least))
    assert isinstance(peer.recv(), Info), "info fits the minimum limits"
    for frames in ([b"", b"\xc1"], [b"", header("launch", {})], [b"", header("fetch", {"job_id": "nope"})]):
        peer.send_frames(frames)  # each answered with an error, encoded within the client's minimum limits
        assert isinstance(peer.recv(), Error)
    assert_alive(peer)
    with connect(server.endpoint) as client:
        assert isinstance(client.hello(), Info)


def test_a_message_over_max_message_bytes_is_refused_whole(tmp_path):
    small = Limits(max_message_bytes=6 << 20, max_image_bytes=4 << 20)
    srv, thread = serve_in_thread(ServerConfig(bind="tcp://127.0.0.1:*", store=tmp_path / "store",
                                               keys=tmp_path / "keys", limits=small))
    peer = RawPeer(srv.endpoint, local_client_curve(tmp_path / "keys"))
    try:
        frames = [header("generate", GENERATE_BODY, frames=IMAGE_FRAME), *[bytes(4 << 20)] * 3]
        peer.send_frames([b"", *frames])  # three frames each within the socket's limit, 12 MiB together
        reply = peer.recv()
        assert isinstance(reply, Error) and reply.code == ErrorCode.LIMIT_EXCEEDED
        assert "max_message_bytes" in reply.message or "max_arrays" in reply.message
        assert_alive(peer)
        assert not list((tmp_path / "store" / "jobs").iterdir()), "nothing of it was kept"
    finally:
        peer.close()
        stop_served(srv, thread)


def test_a_result_from_a_client_is_refused(peer):
    peer.send(Result("job-1"))
    reply = peer.recv()
    assert isinstance(reply, Error) and reply.code == ErrorCode.MALFORMED_MESSAGE and "server" in reply.message
