"""The client against tiny ROUTER servers: job flow, heartbeats and dead backends, throughput, CURVE."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from protocol import (Accepted, BackendUnreachable, Cancel, Cancelled, Client, DeadlineExceeded, Error, ErrorCode,
                      Fetch, Hello, JobCancelled, LimitExceeded, Limits, ModelStatus, Progress,
                      PROTOCOL_VERSION, ProtocolVersionError, RemoteError, Result, Generate, decode, split_envelope)
from protocol_fakes import info_for, png_bytes, standard_handler

FAST = {"heartbeat_interval": 0.1, "dead_after": 0.6, "timeout": 3.0}


def test_hello_returns_and_caches_info(make_server):
    server = make_server()
    with Client(server.address, client_name="blender", client_version="4.2", **FAST) as client:
        info = client.hello()
        assert info.model_status is ModelStatus.READY and client.info() is info
        assert isinstance(client.info(refresh=True), type(info))
    hellos = [m for m in server.received if isinstance(m, Hello)]
    assert hellos == [Hello("blender", "4.2")] * 2


def test_oversized_frames_are_refused_by_the_clients_socket(make_server):
    big = np.zeros(2 << 20, np.uint8)
    server = make_server(lambda m: [Result(m.job_id, mesh={"big": big})] if isinstance(m, Fetch)
                         else standard_handler(m))
    small = Limits(max_frame_bytes=1 << 20)
    with Client(server.address, limits=small, **FAST) as client:
        assert client.hello().limits == Limits() and server.received[0].limits == small
        with pytest.raises((DeadlineExceeded, BackendUnreachable)):  # zmq.MAXMSGSIZE dropped the connection
            client.fetch("job-1", timeout=1.0)


def test_submit_events_cancel_flow(make_server):
    server = make_server()
    with Client(server.address, **FAST) as client:
        job_id = client.submit(Generate(png_bytes(), {"seed": 3}, "mine-1"))
        assert job_id == "job-1"
        seen = []
        for msg in client.events(job_id, timeout=5):
            seen.append(msg)
            if isinstance(msg, Progress):
                client.cancel(job_id)
    assert [type(m) for m in seen] == [Accepted, Progress, Cancelled]
    assert seen[0].client_job_id == "mine-1"
    submit = next(m for m in server.received if isinstance(m, Generate))
    assert submit.settings == {"seed": 3} and submit.client_job_id == "mine-1"
    assert Cancel("job-1") in server.received


def test_generate_returns_the_result_and_reports_progress(make_server):
    def handler(msg):
        if isinstance(msg, Generate):
            return [Accepted("j7", 1, msg.client_job_id), Progress("j7", "shape", 1, 1, 0.5),
                    Result("j7", mesh={"positions": np.zeros((3, 3), np.float32)}, metadata={"ok": True})]
        return []

    server = make_server(handler)
    events = []
    with Client(server.address, **FAST) as client:
        result = client.generate(png_bytes(), on_event=events.append)
    assert result.metadata == {"ok": True} and result.mesh["positions"].shape == (3, 3)
    assert [type(m) for m in events] == [Accepted, Progress, Result]


@pytest.mark.parametrize("reply,error,code", [
    (lambda m: [Error(ErrorCode.QUEUE_FULL, "queue is full", "try later", client_job_id=m.client_job_id)],
     RemoteError, ErrorCode.QUEUE_FULL),
    (lambda m: [Accepted("j", 0, m.client_job_id), Error(ErrorCode.OUT_OF_MEMORY, "OOM", "smaller", job_id="j")],
     RemoteError, ErrorCode.OUT_OF_MEMORY),
    (lambda m: [Accepted("j", 0, m.client_job_id), Cancelled("j")], JobCancelled, ErrorCode.CANCELLED),
])
def test_generate_raises_for_refusals_failures_and_cancellation(make_server, reply, error, code):
    server = make_server(lambda m: reply(m) if isinstance(m, Generate) else [])
    with Client(server.address, **FAST) as client, pytest.raises(error) as info:
        client.generate(png_bytes())
    assert info.value.code is code and info.value.hint


def test_events_of_several_jobs_are_kept_apart(make_server):
    counter = iter(range(100))

    def handler(msg):
        if isinstance(msg, Generate):
            job = f"job-{next(counter)}"
            return [Accepted(job, 0, msg.client_job_id), Progress(job, "s", 1, 2, 0.5), Cancelled(job)]
        return []

    server = make_server(handler)
    with Client(server.address, **FAST) as client:
        first, second = client.submit(Generate(png_bytes())), client.submit(Generate(png_bytes()))
        time.sleep(0.2)  # both jobs' events are now waiting in the socket, interleaved
        assert [type(m) for m in client.events(second)] == [Accepted, Progress, Cancelled]
        assert [m.job_id for m in client.events(first)] == [first] * 3
        assert client.poll_event(0) is None


def test_poll_event_never_blocks_and_delivers_everything(make_server):
    server = make_server()
    with Client(server.address, **FAST) as client:
        start = time.monotonic()
        assert client.poll_event(0) is None
        assert time.monotonic() - start < 0.5  # a blocking wait would take the 3 s timeout
        job_id = client.submit(Generate(png_bytes()))
        got = []
        deadline = time.monotonic() + 2
        while len(got) < 2 and time.monotonic() < deadline:  # Blender-timer style polling
            msg = client.poll_event(20)
            if msg is not None:
                got.append(msg)
        assert [type(m) for m in got] == [Accepted, Progress] and got[0].job_id == job_id


def test_fetch_returns_the_terminal_message(make_server):
    server = make_server()
    with Client(server.address, **FAST) as client:
        result = client.fetch("old-job")
    assert isinstance(result, Result) and result.job_id == "old-job"
    assert Fetch("old-job") in server.received


def test_client_obeys_the_servers_advertised_limits(make_server):
    small = Limits(max_image_pixels=100)
    server = make_server(lambda m: [info_for(small)] if isinstance(m, Hello) else [])
    with Client(server.address, **FAST) as client:
        client.hello()
        with pytest.raises(LimitExceeded, match="max_image_pixels"):
            client.submit(Generate(png_bytes(64, 64, 3)))
    assert not any(isinstance(m, Generate) for m in server.received)


def test_dead_backend_is_detected_at_once(make_server):
    server = make_server()
    address = server.address
    server.stop()  # nothing listens on the port any more
    with Client(address, **FAST) as client:
        start = time.monotonic()
        with pytest.raises(BackendUnreachable) as info:
            client.hello()
        elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 1.5, elapsed
    assert info.value.code is ErrorCode.BACKEND_UNREACHABLE and "python -m backend" in info.value.hint


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_backend_dying_mid_job_is_detected_within_a_second(make_server, how):
    server = make_server()
    with Client(server.address, **FAST) as client:
        job_id = client.submit(Generate(png_bytes()))
        if how == "killed":
            server.stop()
        else:
            server.mute = True  # process alive, socket connected, but nothing answers
        start = time.monotonic()
        with pytest.raises(BackendUnreachable):
            for _ in client.events(job_id):
                pass
        assert time.monotonic() - start < 1.5


def test_heartbeats_keep_a_slow_job_alive(make_server):
    server = make_server()
    with Client(server.address, **FAST) as client:
        job_id = client.submit(Generate(png_bytes()))
        threading.Timer(1.5, server.push, [Cancelled(job_id)]).start()  # 2.5x dead_after later
        kinds = [type(m) for m in client.events(job_id, timeout=5)]
    assert kinds == [Accepted, Progress, Cancelled]
    assert sum(type(m).__name__ == "Ping" for m in server.received) >= 10


def test_alive_backend_that_never_finishes_hits_the_callers_deadline(make_server):
    server = make_server()
    with Client(server.address, **FAST) as client:
        job_id = client.submit(Generate(png_bytes()))
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=job_id):
            list(client.events(job_id, timeout=0.8))
        assert 0.8 <= time.monotonic() - start < 1.5


def test_server_speaking_another_version_gives_a_clear_error():
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def answer_from_the_future():
        if router.poll(3000):
            identity, *_ = router.recv_multipart()
            header = {"v": PROTOCOL_VERSION + 1, "type": "info", "body": {"layout": "changed"}, "frames": []}
            router.send_multipart([identity, b"", msgpack.packb(header)])

    thread = threading.Thread(target=answer_from_the_future)
    thread.start()
    try:
        with Client(f"tcp://127.0.0.1:{port}", **FAST) as client, pytest.raises(ProtocolVersionError) as info:
            client.hello()
        assert (info.value.local_version, info.value.remote_version) == (PROTOCOL_VERSION, PROTOCOL_VERSION + 1)
    finally:
        thread.join()
        router.close(linger=0)


def test_server_answers_garbage_with_a_coded_error_the_client_raises(make_server):
    server = make_server()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    try:
        dealer.connect(server.address)
        dealer.send_multipart([b"", msgpack.packb({"v": PROTOCOL_VERSION, "type": "launch_missiles"})])
        assert dealer.poll(2000)
        _, frames = split_envelope(dealer.recv_multipart())
        reply = decode(frames)
        assert isinstance(reply, Error) and reply.code is ErrorCode.MALFORMED_MESSAGE
        assert reply.job_id is None and "header keys" in reply.message
    finally:
        dealer.close(linger=0)


def test_loopback_100_mb_float32_array(make_server, capsys):
    big = np.random.default_rng(0).random(25 * 1024 * 1024, dtype=np.float32)  # 100 MiB
    server = make_server(lambda m: [Result(m.job_id, mesh={"big": big})] if isinstance(m, Fetch) else [])
    with Client(server.address, **FAST) as client:
        start = time.perf_counter()
        result = client.fetch("big-job", timeout=30)
        seconds = time.perf_counter() - start
    out = result.mesh["big"]
    assert out.dtype == np.float32 and out.shape == big.shape
    assert out.tobytes() == big.tobytes()
    assert not out.flags.owndata and not out.flags.writeable  # a view of the received frame
    with capsys.disabled():
        print(f"\n[protocol loopback] {big.nbytes / 2**20:.0f} MiB float32 array over tcp://127.0.0.1 "
              f"(request, result, decode) in {seconds:.3f} s = {big.nbytes / 2**20 / seconds:.0f} MiB/s")


def test_curve_encryption(make_server):
    server_public, server_secret = zmq.curve_keypair()
    server = make_server(curve_secret_key=server_secret)
    with Client(server.address, curve_server_key=server_public.decode(), **FAST) as client:
        assert client.hello().server == "fake"
    wrong_public, _ = zmq.curve_keypair()
    with Client(server.address, curve_server_key=wrong_public, **FAST) as client:
        with pytest.raises(BackendUnreachable):  # a CURVE handshake failure is silent: only liveness shows it
            client.hello()


def test_constructor_and_closed_client_misuse():
    with pytest.raises(ValueError, match="dead_after"):
        Client("tcp://127.0.0.1:1", heartbeat_interval=2, dead_after=1)
    with pytest.raises(ValueError, match="cannot connect"):
        Client("nonsense://where")
    with pytest.raises(ValueError, match="CURVE key"):
        Client("tcp://127.0.0.1:1", curve_server_key="short")
    client = Client("tcp://127.0.0.1:1")
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.poll_event()
