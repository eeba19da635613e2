"""A small client for the backend, usable from Blender, scripts and tests.

Blocking use (scripts, `blender -b`):

    with Client("tcp://127.0.0.1:5555") as client:
        client.hello()
        result = client.generate(open("chair.png", "rb").read(), {"seed": 1}, on_event=print)
        again = client.run(Reprocess(result.job_id, {"faces": 20000}))

Timer-driven use (Blender's UI, which must never block): submit once, then call
`poll_event(0)` from a `bpy.app.timers` callback until it returns None, handling what comes.

Liveness: while waiting, the client pings every `heartbeat_interval` seconds; when nothing at all
(pong included) has come back `dead_after` seconds after something was sent, it opens a fresh socket (so requests
queued for the dead peer are not replayed to a restarted one) and raises BackendUnreachable, or, while it follows
jobs and `resume_for` allows, keeps reconnecting for that long. Jobs live on in the backend: `fetch(job_id)` gets
their result later.

Resuming: every pong names the server's instance and whether it holds this connection's hello. A new instance (the
server restarted) or a forgotten hello (the connection was re-made) makes the client greet again, resend the
submits still waiting for their answer (same `client_job_id`: the server answers a repeat with the job it already
made) and fetch every job it follows, so it receives every ending it missed; each followed job's events then
include a `Notice` ("backend restarted, resuming").

Thread-safety: a Client owns one zmq socket, and zmq sockets must not be used from two threads.
Use one Client per thread, created and used in that thread.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, replace
from time import monotonic
from typing import Any, Callable, ClassVar, Iterator, Mapping, NoReturn

import zmq

from .codec import decode, encode
from .errors import BackendUnreachable, DeadlineExceeded, JobCancelled, MalformedMessage, ProtocolError
from .limits import DEFAULT_LIMITS, Limits
from .messages import (Accepted, Cancel, Cancelled, Error, Fetch, Generate, Hello, Info, Message, Ping, Pong,
                       Request, Result)
from .transport import configure_socket, split_envelope

RESTARTED = "backend restarted, resuming"
RECONNECTED = "reconnected to the backend, resuming"
LOST = "lost the backend, reconnecting"


@dataclass(frozen=True)
class Notice:
    """Not a wire message: the client's own word about a followed job's connection (LOST, RESTARTED, RECONNECTED),
    yielded among that job's events so a progress display can say it."""

    job_id: str
    text: str
    TERMINAL: ClassVar[bool] = False


Event = Message | Notice


class Client:
    """DEALER-socket client speaking the protocol to one backend address."""

    def __init__(self, address: str, *, timeout: float | None = 10.0, heartbeat_interval: float = 1.0,
                 dead_after: float = 5.0, resume_for: float = 0.0, curve_server_key: str | bytes | None = None,
                 curve_client_keys: tuple[str | bytes, str | bytes] | None = None,
                 limits: Limits = DEFAULT_LIMITS, client_name: str = "trellis2-client",
                 client_version: str = "unknown"):
        """`timeout`: seconds to wait for the answer to hello/submit (None: as long as the backend lives).
        `resume_for`: seconds to keep reconnecting to a backend that went silent while jobs are followed (a restart
        takes a few); 0 raises BackendUnreachable after `dead_after`.
        `curve_server_key`: the server's public CURVE key (Z85 text or 32 raw bytes) turns on
        encryption; `curve_client_keys` (public, secret) defaults to a fresh keypair.
        `limits`: what this client accepts; what it sends obeys the server's advertised limits."""
        if heartbeat_interval <= 0 or dead_after <= heartbeat_interval:
            raise ValueError("need 0 < heartbeat_interval < dead_after")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive or None")
        if resume_for < 0:
            raise ValueError("resume_for must be >= 0")
        if curve_client_keys is not None and curve_server_key is None:
            raise ValueError("curve_client_keys need curve_server_key")
        self.address = address
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.resume_for = resume_for
        self.client_name = client_name
        self.client_version = client_version
        self.server_info: Info | None = None
        self._limits = limits
        self._outbound_limits = limits
        self._curve = None
        if curve_server_key is not None:
            public, secret = curve_client_keys or zmq.curve_keypair()
            self._curve = (_curve_key(curve_server_key), _curve_key(public), _curve_key(secret))
        self._pending: deque[Event] = deque()  # received but not yet asked for
        self._followed: dict[str, None] = {}  # jobs whose terminal message has not arrived (an ordered set)
        self._unanswered: dict[str, Request] = {}  # submits waiting for accepted/error, by client_job_id
        self._instance: str | None = None  # the server instance last heard of
        self._greeting_since: float | None = None  # a resume's hello is out and its info not yet back
        self._lost_since: float | None = None  # the backend went silent while jobs were followed
        self._resumes = 0  # resumes and losses so far: a wait interrupted by one gets its full timeout again
        self._ping_seq = 0
        self._socket: zmq.Socket | None = None
        self._open()

    # -- public API ----------------------------------------------------------------------------

    def hello(self) -> Info:
        """Introduce this client; return (and keep in `server_info`) the backend's Info."""
        self._send(self._hello())
        return self._expect(lambda m: isinstance(m, Info), "info")

    def info(self, refresh: bool = False) -> Info:
        """The backend's Info: cached from the last hello() unless `refresh` or none yet."""
        return self.hello() if refresh or self.server_info is None else self.server_info

    def submit(self, request: Request) -> str:
        """Queue a job (Generate, Reprocess or Texture) and return its job id; the Accepted answer is the first of
        its events(). Raises RemoteError when the backend refuses it (queue_full, invalid_settings, ...). A submit
        interrupted by a server restart is sent again under the same client_job_id, which the server answers with
        the job it already made, if it got that far."""
        cid = request.client_job_id or uuid.uuid4().hex
        request = replace(request, client_job_id=cid)
        self._unanswered[cid] = request
        try:
            self._send(request)
            answer = self._expect(lambda m: isinstance(m, (Accepted, Error)) and m.client_job_id == cid,
                                  "answer to the submit")
        finally:
            self._unanswered.pop(cid, None)
        if isinstance(answer, Error):
            raise answer.to_exception()
        self._pending.appendleft(answer)
        return answer.job_id

    def events(self, job_id: str, timeout: float | None = None) -> Iterator[Event]:
        """Yield the job's events (Accepted, Progress, Notice, ...) up to and including the terminal message (Result,
        Error or Cancelled). `timeout` bounds the whole wait; None waits while the backend lives (or comes back
        within `resume_for`). Messages of other jobs are kept for their own events()/poll_event()."""
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            msg = self._wait(lambda m: getattr(m, "job_id", None) == job_id, deadline)
            if msg is None:
                raise DeadlineExceeded(f"job {job_id} did not finish within {timeout} s")
            yield msg
            if msg.TERMINAL:
                return

    def poll_event(self, timeout_ms: int = 0) -> Event | None:
        """The next received event of any job, or None after `timeout_ms`; never blocks longer.
        Keeps the heartbeat going, so calling it from a timer also detects a dead backend."""
        return self._wait(lambda m: not isinstance(m, Info), monotonic() + timeout_ms / 1000)

    def cancel(self, job_id: str) -> None:
        """Ask the backend to cancel a job; its events() end with Cancelled (or the result, if late)."""
        self._follow(job_id)
        self._send(Cancel(job_id))

    def fetch(self, job_id: str, timeout: float | None = None) -> Message:
        """Follow a job (its events come to this client too) and return its terminal message."""
        self._follow(job_id)
        self._send(Fetch(job_id))
        for msg in self.events(job_id, timeout):
            pass
        return msg

    def generate(self, image: bytes, settings: Mapping[str, Any] | None = None, *,
                 on_event: Callable[[Event], None] | None = None, timeout: float | None = None) -> Result:
        """`run(Generate(image, settings))`: image in, Result out."""
        return self.run(Generate(image, dict(settings or {})), on_event=on_event, timeout=timeout)

    def run(self, request: Request, *, on_event: Callable[[Event], None] | None = None,
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
        self._greeting_since = None

    def _reopen(self) -> None:
        """A fresh socket, so nothing queued for a dead peer is replayed later (to a restarted one, say)."""
        self.close()
        self._open()

    def _live_socket(self) -> zmq.Socket:
        if self._socket is None:
            raise RuntimeError("this Client is closed")
        return self._socket

    def _hello(self) -> Hello:
        return Hello(self.client_name, self.client_version, self._limits)

    def _follow(self, job_id: str) -> None:
        """Follow `job_id` until its terminal message arrives, unless that is already here."""
        if not any(m.job_id == job_id and m.TERMINAL for m in self._pending):
            self._followed[job_id] = None

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
        """Ping when due; when the backend has been silent too long, reconnect (following jobs, within
        `resume_for`) or raise BackendUnreachable."""
        now = monotonic()
        if self._lost_since is not None and now >= self._give_up_at():
            self._raise_unreachable(f"no message from the backend at {self.address} for {now - self._lost_since:.1f} "
                                    f"s; gave up after reconnecting for {self.resume_for:g} s")
        if self._silent_since is not None and now - self._silent_since >= self.dead_after:
            if not (self.resume_for and (self._followed or self._unanswered)):
                self._raise_unreachable(f"no message from the backend at {self.address} for "
                                        f"{now - self._silent_since:.1f} s (pinging every {self.heartbeat_interval:g} s)")
            if self._lost_since is None:
                self._lost_since = self._silent_since
                self._resumes += 1
                self._pending.extend(Notice(job_id, LOST) for job_id in self._followed)
            self._reopen()
        if now >= self._next_ping:
            self._ping_seq += 1
            self._send(Ping(self._ping_seq))

    def _give_up_at(self) -> float:
        return math.inf if self._lost_since is None else self._lost_since + self.dead_after + self.resume_for

    def _raise_unreachable(self, message: str) -> NoReturn:
        self._lost_since = None
        self._reopen()
        raise BackendUnreachable(message)

    def _resume(self, why: str) -> None:
        """The server restarted or forgot this connection: greet it, resend the unanswered submits, fetch the
        followed jobs (each gets a Notice)."""
        self._resumes += 1
        self._send(self._hello())
        self._greeting_since = monotonic()
        for request in self._unanswered.values():
            self._send(request)
        for job_id in self._followed:
            self._send(Fetch(job_id))
            self._pending.append(Notice(job_id, why))

    def _wait(self, accept: Callable[[Event], bool], deadline: float | None) -> Event | None:
        """First kept or arriving event that `accept`s, pinging while waiting; None at the deadline."""
        for i, msg in enumerate(self._pending):
            if accept(msg):
                del self._pending[i]
                return msg
        while True:
            self._heartbeat()
            wake = min(self._next_ping, deadline if deadline is not None else math.inf, self._give_up_at(),
                       self._silent_since + self.dead_after if self._silent_since is not None else math.inf)
            if self._live_socket().poll(max(0, math.ceil((wake - monotonic()) * 1000)), zmq.POLLIN):
                msg = self._read()
                if msg is not None and accept(msg):
                    return msg
                if msg is not None and not isinstance(msg, Info):  # a resume's info is nobody's answer
                    self._pending.append(msg)
            if deadline is not None and monotonic() >= deadline:
                return None
            for i, msg in enumerate(self._pending):  # notices a resume queued while reading
                if isinstance(msg, Notice) and accept(msg):
                    del self._pending[i]
                    return msg

    def _read(self) -> Message | None:
        """Receive and decode one message; None for what only this client's bookkeeping needs (pongs, repeats, events
        of jobs it does not follow). A job-less Error is raised."""
        frames = self._live_socket().recv_multipart(zmq.NOBLOCK, copy=False)
        self._silent_since = None  # anything at all, even garbage, proves the backend alive
        back_from_loss = self._lost_since is not None
        self._lost_since = None
        identity, frames = split_envelope(frames)
        if identity:
            raise MalformedMessage("the backend sent routing frames to a DEALER client")
        msg = decode(frames, self._limits, sender="server")
        if isinstance(msg, Pong):
            self._check_instance(msg, back_from_loss)
            return None
        if isinstance(msg, Info):
            self.server_info, self._outbound_limits = msg, msg.limits
            self._instance, self._greeting_since = msg.instance, None
            return msg
        if isinstance(msg, Accepted) or (isinstance(msg, Error) and msg.job_id is None):
            if isinstance(msg, Error) and msg.client_job_id is None:
                raise msg.to_exception()
            if msg.client_job_id not in self._unanswered:
                return None  # the answer to a submit resent on resume, already answered
            if isinstance(msg, Accepted):
                self._followed[msg.job_id] = None
            return msg
        if msg.job_id not in self._followed:
            return None  # e.g. the ending of a job fetched twice around a resume
        if msg.TERMINAL:
            del self._followed[msg.job_id]
        return msg

    def _check_instance(self, pong: Pong, back_from_loss: bool) -> None:
        """Resume when the server restarted or forgot this connection's hello (unless a resume's hello is still on
        its way: pongs to pings sent before it say so too)."""
        if self._instance is None:
            self._instance = pong.instance
        restarted = pong.instance != self._instance
        forgotten = self.server_info is not None and not pong.greeted
        greeting = self._greeting_since is not None and monotonic() - self._greeting_since < self.dead_after
        if (restarted or forgotten) and not greeting:
            self._resume(RESTARTED if restarted else RECONNECTED)
        elif back_from_loss:  # the same server answers again on a fresh socket: it has not seen it yet
            self._resume(RECONNECTED)

    def _expect(self, accept: Callable[[Message], bool], what: str) -> Message:
        deadline = None if self.timeout is None else monotonic() + self.timeout
        resumes = self._resumes
        while True:
            msg = self._wait(lambda m: not isinstance(m, Notice) and accept(m), deadline)
            if msg is not None:
                return msg
            if resumes == self._resumes and self._lost_since is None:
                raise DeadlineExceeded(f"the backend at {self.address} answers pings but sent no {what} "
                                       f"within {self.timeout:g} s")
            resumes, deadline = self._resumes, monotonic() + self.timeout


def _curve_key(key: str | bytes) -> bytes:
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(raw) not in (32, 40):
        raise ValueError("a CURVE key is 40 characters of Z85 text or 32 raw bytes")
    return raw
