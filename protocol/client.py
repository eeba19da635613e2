"""A small client for the backend, usable from Blender, scripts and tests.

Blocking use (scripts, `blender -b`):

    with Client("tcp://127.0.0.1:5555") as client:
        client.hello()
        result = client.generate(open("chair.png", "rb").read(), {"seed": 1}, on_event=print)
        again = client.run(Reprocess(result.job_id, {"faces": 20000}))

Timer-driven use (Blender's UI, which must never block): submit once, then call
`poll_event(0)` from a `bpy.app.timers` callback until it returns None, handling what comes.

Liveness: while waiting, the client pings every `heartbeat_interval` seconds; when nothing at all
(pong included) has come back `dead_after` seconds after something was sent, it raises
BackendUnreachable and opens a fresh socket, so requests queued for the dead peer are not replayed
to a restarted one. Jobs live on in the backend: `fetch(job_id)` gets their result later.

Thread-safety: a Client owns one zmq socket, and zmq sockets must not be used from two threads.
Use one Client per thread, created and used in that thread.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from contextlib import suppress
from dataclasses import replace
from time import monotonic
from typing import Any, Callable, Iterator, Mapping, NoReturn

import zmq

from .codec import decode, encode
from .errors import BackendUnreachable, DeadlineExceeded, JobCancelled, MalformedMessage, ProtocolError
from .limits import DEFAULT_LIMITS, Limits
from .messages import (Accepted, Cancel, Cancelled, Error, Fetch, Generate, Hello, Info, Message, Ping, Pong,
                       Request, Result)
from .transport import configure_socket, split_envelope


class Client:
    """DEALER-socket client speaking the protocol to one backend address."""

    def __init__(self, address: str, *, timeout: float | None = 10.0, heartbeat_interval: float = 1.0,
                 dead_after: float = 5.0, curve_server_key: str | bytes | None = None,
                 curve_client_keys: tuple[str | bytes, str | bytes] | None = None,
                 limits: Limits = DEFAULT_LIMITS, client_name: str = "trellis2-client",
                 client_version: str = "unknown"):
        """`timeout`: seconds to wait for the answer to hello/submit (None: as long as the backend lives).
        `curve_server_key`: the server's public CURVE key (Z85 text or 32 raw bytes) turns on
        encryption; `curve_client_keys` (public, secret) defaults to a fresh keypair.
        `limits`: what this client accepts; what it sends obeys the server's advertised limits."""
        if heartbeat_interval <= 0 or dead_after <= heartbeat_interval:
            raise ValueError("need 0 < heartbeat_interval < dead_after")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive or None")
        if curve_client_keys is not None and curve_server_key is None:
            raise ValueError("curve_client_keys need curve_server_key")
        self.address = address
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.client_name = client_name
        self.client_version = client_version
        self.server_info: Info | None = None
        self._limits = limits
        self._outbound_limits = limits
        self._curve = None
        if curve_server_key is not None:
            public, secret = curve_client_keys or zmq.curve_keypair()
            self._curve = (_curve_key(curve_server_key), _curve_key(public), _curve_key(secret))
        self._pending: deque[Message] = deque()  # received but not yet asked for
        self._ping_seq = 0
        self._socket: zmq.Socket | None = None
        self._open()

    # -- public API ----------------------------------------------------------------------------

    def hello(self) -> Info:
        """Introduce this client; return (and keep in `server_info`) the backend's Info."""
        self._send(Hello(self.client_name, self.client_version, self._limits))
        info = self._expect(lambda m: isinstance(m, Info), "info")
        self.server_info = info
        self._outbound_limits = info.limits
        return info

    def info(self, refresh: bool = False) -> Info:
        """The backend's Info: cached from the last hello() unless `refresh` or none yet."""
        return self.hello() if refresh or self.server_info is None else self.server_info

    def submit(self, request: Request) -> str:
        """Queue a job (Generate, Reprocess or Texture) and return its job id; the Accepted answer is the first of
        its events(). Raises RemoteError when the backend refuses it (queue_full, invalid_settings, ...)."""
        cid = request.client_job_id or uuid.uuid4().hex
        self._send(replace(request, client_job_id=cid))
        answer = self._expect(lambda m: isinstance(m, (Accepted, Error)) and m.client_job_id == cid,
                              "answer to the submit")
        if isinstance(answer, Error):
            raise answer.to_exception()
        self._pending.appendleft(answer)
        return answer.job_id

    def events(self, job_id: str, timeout: float | None = None) -> Iterator[Message]:
        """Yield the job's messages (Accepted, Progress, ...) up to and including the terminal one
        (Result, Error or Cancelled). `timeout` bounds the whole wait; None waits while the backend
        lives. Messages of other jobs are kept for their own events()/poll_event()."""
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            msg = self._wait(lambda m: getattr(m, "job_id", None) == job_id, deadline)
            if msg is None:
                raise DeadlineExceeded(f"job {job_id} did not finish within {timeout} s")
            yield msg
            if msg.TERMINAL:
                return

    def poll_event(self, timeout_ms: int = 0) -> Message | None:
        """The next received message of any job, or None after `timeout_ms`; never blocks longer.
        Keeps the heartbeat going, so calling it from a timer also detects a dead backend."""
        return self._wait(lambda m: True, monotonic() + timeout_ms / 1000)

    def cancel(self, job_id: str) -> None:
        """Ask the backend to cancel a job; its events() end with Cancelled (or the result, if late)."""
        self._send(Cancel(job_id))

    def fetch(self, job_id: str, timeout: float | None = None) -> Message:
        """Ask the backend to send a job's terminal message again and return it."""
        self._send(Fetch(job_id))
        for msg in self.events(job_id, timeout):
            pass
        return msg

    def generate(self, image: bytes, settings: Mapping[str, Any] | None = None, *,
                 on_event: Callable[[Message], None] | None = None, timeout: float | None = None) -> Result:
        """`run(Generate(image, settings))`: image in, Result out."""
        return self.run(Generate(image, dict(settings or {})), on_event=on_event, timeout=timeout)

    def run(self, request: Request, *, on_event: Callable[[Message], None] | None = None,
            timeout: float | None = None) -> Result:
        """Submit, wait and return the Result; raise RemoteError / JobCancelled otherwise.
        An interrupted wait (Ctrl-C, timeout, dead backend) cancels the job on a best-effort basis."""
        job_id = self.submit(request)
        try:
            for msg in self.events(job_id, timeout):
                if on_event is not None:
                    on_event(msg)
        except BaseException:
            with suppress(ProtocolError):
                self.cancel(job_id)
            raise
        if isinstance(msg, Error):
            raise msg.to_exception()
        if isinstance(msg, Cancelled):
            raise JobCancelled(f"job {job_id} was cancelled")
        return msg

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _open(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        configure_socket(sock, self._limits, "client")
        sock.setsockopt(zmq.SNDTIMEO, int(self.dead_after * 1000))
        if self._curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve
        try:
            sock.connect(self.address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ValueError(f"cannot connect to {self.address!r}: {exc}") from exc
        self._socket = sock
        self._silent_since: float | None = None  # when the oldest unanswered send happened
        self._next_ping = monotonic()

    def _live_socket(self) -> zmq.Socket:
        if self._socket is None:
            raise RuntimeError("this Client is closed")
        return self._socket

    def _send(self, msg: Message) -> None:
        frames = encode(msg, self._outbound_limits)
        now = monotonic()
        try:
            self._live_socket().send_multipart([b"", *frames], copy=False)
        except zmq.Again:
            self._raise_unreachable(f"could not hand a message to the backend at {self.address} "
                                    f"for {self.dead_after:g} s")
        if self._silent_since is None:
            self._silent_since = now
        self._next_ping = now + self.heartbeat_interval

    def _heartbeat(self) -> None:
        """Raise BackendUnreachable if the backend has been silent too long; ping when due."""
        now = monotonic()
        if self._silent_since is not None and now - self._silent_since >= self.dead_after:
            self._raise_unreachable(f"no message from the backend at {self.address} for "
                                    f"{now - self._silent_since:.1f} s (pinging every {self.heartbeat_interval:g} s)")
        if now >= self._next_ping:
            self._ping_seq += 1
            self._send(Ping(self._ping_seq))

    def _raise_unreachable(self, message: str) -> NoReturn:
        self.close()
        self._open()  # a fresh socket, so nothing queued for the dead peer is replayed later
        raise BackendUnreachable(message)

    def _wait(self, accept: Callable[[Message], bool], deadline: float | None) -> Message | None:
        """First kept or arriving message that `accept`s, pinging while waiting; None at the deadline."""
        for i, msg in enumerate(self._pending):
            if accept(msg):
                del self._pending[i]
                return msg
        while True:
            self._heartbeat()
            wake = min(self._next_ping, deadline if deadline is not None else math.inf,
                       self._silent_since + self.dead_after if self._silent_since is not None else math.inf)
            if self._live_socket().poll(max(0, math.ceil((wake - monotonic()) * 1000)), zmq.POLLIN):
                msg = self._read()
                if msg is not None and accept(msg):
                    return msg
                if msg is not None:
                    self._pending.append(msg)
            if deadline is not None and monotonic() >= deadline:
                return None

    def _read(self) -> Message | None:
        """Receive and decode one message; None for a pong. A job-less Error is raised."""
        frames = self._live_socket().recv_multipart(zmq.NOBLOCK, copy=False)
        self._silent_since = None  # anything at all, even garbage, proves the backend alive
        identity, frames = split_envelope(frames)
        if identity:
            raise MalformedMessage("the backend sent routing frames to a DEALER client")
        msg = decode(frames, self._limits, sender="server")
        if isinstance(msg, Error) and msg.job_id is None and msg.client_job_id is None:
            raise msg.to_exception()
        return None if isinstance(msg, Pong) else msg

    def _expect(self, accept: Callable[[Message], bool], what: str) -> Message:
        deadline = None if self.timeout is None else monotonic() + self.timeout
        msg = self._wait(accept, deadline)
        if msg is None:
            raise DeadlineExceeded(f"the backend at {self.address} answers pings but sent no {what} "
                                   f"within {self.timeout:g} s")
        return msg


def _curve_key(key: str | bytes) -> bytes:
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(raw) not in (32, 40):
        raise ValueError("a CURVE key is 40 characters of Z85 text or 32 raw bytes")
    return raw
