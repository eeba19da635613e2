"""A client following jobs through a server restart, a lost connection or a dead backend: it greets again, resends
what was unanswered, fetches what it follows, says so with a Notice, and never waits without end."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest

from protocol import (Accepted, BackendUnreachable, Cancelled, Client, Error, Fetch, Generate, Hello,
                      MalformedMessage, Notice, Progress, Result, decode, encode)
from protocol.client import LOST, RECONNECTED, RESTARTED
from protocol.limits import PEER_MINIMUM, Limits
from protocol_fakes import FakeServer, info_for, png_bytes

FAST = {"heartbeat_interval": 0.1, "dead_after": 0.6, "timeout": 3.0}


def jobs_handler(finished: set[str]):
    """A backend whose job "job-1" runs until its id is put in `finished`; then a fetch returns its result."""

    def handle(msg):
        if isinstance(msg, Hello):
            return [info_for()]
        if isinstance(msg, Generate):
            return [Accepted("job-1", 0, msg.client_job_id), Progress("job-1", "shape", 1, 2, 0.5)]
        if isinstance(msg, Fetch):
            return [Result(msg.job_id)] if msg.job_id in finished else [Progress(msg.job_id, "shape", 1, 2, 0.5)]
        return []

    return handle


def test_a_client_below_the_minimum_limits_is_refused_at_hello():
    tiny = Limits(max_header_bytes=16)
    with pytest.raises(MalformedMessage, match="max_header_bytes = 16 .minimum 65536."):
        Hello("c", "1", tiny)
    frames = encode(Hello("c", "1", Limits(max_header_bytes=PEER_MINIMUM["max_header_bytes"])))
    assert decode(frames).limits.max_header_bytes == PEER_MINIMUM["max_header_bytes"]
    header = msgpack.unpackb(frames[0])
    header["body"]["limits"]["max_header_bytes"] = 16  # what a hostile client sends instead
    with pytest.raises(MalformedMessage, match="below what every client must accept"):
        decode([msgpack.packb(header)], sender="client")


def test_a_restarted_server_is_noticed_and_the_job_resumed(make_server):
    finished: set[str] = set()
    server = make_server(jobs_handler(finished))
    with Client(server.address, **FAST) as client:
        client.hello()
        job_id = client.submit(Generate(png_bytes()))
        events = client.events(job_id, timeout=5)
        assert [type(next(events)), type(next(events))] == [Accepted, Progress]
        server.restart()  # a new instance that knows no connection
        finished.add(job_id)
        rest = list(events)
    assert rest[0] == Notice(job_id, RESTARTED) and isinstance(rest[-1], Result)
    assert client.server_info.instance == "fake-2"
    sent = [type(m) for m in server.received if type(m).__name__ != "Ping"]
    assert sent == [Hello, Generate, Hello, Fetch], "greeted again, then fetched the job it follows"


def test_a_reconnected_socket_greets_again_and_fetches(make_server):
    finished: set[str] = set()
    server = make_server(jobs_handler(finished))
    with Client(server.address, **FAST) as client:
        client.hello()
        job_id = client.submit(Generate(png_bytes()))
        server._greeted.clear()  # what the server sees when the connection was made anew: no hello on it
        finished.add(job_id)
        events = [m for m in client.events(job_id, timeout=5)]
    assert Notice(job_id, RECONNECTED) in events and isinstance(events[-1], Result)
    assert sum(isinstance(m, Result) for m in events) == 1


def test_a_killed_server_replaced_on_its_address_is_followed_through(make_server):
    finished: set[str] = set()
    first = make_server(jobs_handler(finished))
    replacement: list[FakeServer] = []

    def restart_later():
        time.sleep(1.0)  # longer than dead_after: the client has seen the backend go silent
        finished.add("job-1")
        replacement.append(FakeServer(jobs_handler(finished), address=first.address))
        replacement[0].restart()

    with Client(first.address, resume_for=10.0, **FAST) as client:
        client.hello()
        job_id = client.submit(Generate(png_bytes()))
        first.stop()
        threading.Thread(target=restart_later).start()
        try:
            events = list(client.events(job_id, timeout=10))
        finally:
            while not replacement:
                time.sleep(0.05)
            replacement[0].stop()
    notices = [m.text for m in events if isinstance(m, Notice)]
    assert notices[:2] == [LOST, RESTARTED] and isinstance(events[-1], Result)


def test_a_submit_interrupted_by_a_restart_is_sent_again_with_its_client_job_id(make_server):
    seen: list[str] = []

    def handler(msg):
        if isinstance(msg, Hello):
            return [info_for()]
        if isinstance(msg, Generate):
            seen.append(msg.client_job_id)
            if len(seen) == 1:
                server.restart()  # dies before answering
                return []
            return [Accepted("job-1", 0, msg.client_job_id), Cancelled("job-1")]
        return []

    server = make_server(handler)
    with Client(server.address, **FAST) as client:
        client.hello()
        job_id = client.submit(Generate(png_bytes(), client_job_id="mine-1"))
        assert [m for m in client.events(job_id, timeout=5) if not isinstance(m, Notice)][-1] == Cancelled(job_id)
    assert seen == ["mine-1", "mine-1"]


def test_a_backend_that_stays_away_ends_the_wait_after_the_resume_window(make_server):
    server = make_server(jobs_handler(set()))
    with Client(server.address, resume_for=1.0, **FAST) as client:
        client.hello()
        job_id = client.submit(Generate(png_bytes()))
        server.stop()
        start = time.monotonic()
        seen = []
        with pytest.raises(BackendUnreachable, match="gave up after reconnecting for 1 s"):
            for msg in client.events(job_id):
                seen.append(msg)
        assert 1.4 <= time.monotonic() - start < 3.0
    assert Notice(job_id, LOST) in seen


def test_a_repeated_ending_reaches_the_caller_once(make_server):
    server = make_server(lambda m: [Error("unknown_job", "gone", "", m.job_id)] * 2 if isinstance(m, Fetch) else [])
    with Client(server.address, **FAST) as client:
        first = client.fetch("job-9", timeout=3)
        assert isinstance(first, Error) and first.job_id == "job-9"
        time.sleep(0.3)
        assert client.poll_event(100) is None, "the second copy is nobody's event"
