"""`python -m backend serve`: the ZeroMQ job server. One ROUTER socket, served by an I/O loop that never waits for
the GPU and that no client can end or wedge.

Threads: the I/O loop (this module, the only user of the socket), the worker pool's supervisors (pool.py: one per
worker, which runs on a thread here, in a process of its own or on a cluster) and pyzmq's CURVE authenticator. The
pool hands its messages over through a queue and wakes the loop through a socket pair, so a ping is answered at once
even while jobs run. Every job is in the on-disk store (store.py) before its `accepted`
is sent, and belongs to its owner (the submitting client's key), not to a connection: every connection that
submitted, fetched or cancelled it gets its events (peers.py), and its one terminal message is recorded before it
is sent, so a client that reconnects, or talks to a restarted server (`info` and every `pong` carry this process's
instance id), fetches what it missed. Every send is guarded: a reply that cannot be encoded for a client or sent to
it costs that reply, never the loop.

Shutdown (SIGINT/SIGTERM, or `stop()`): no new job starts; the running one gets `--grace` seconds to finish, then is
stopped at its next step and left queued on disk, like every waiting job: they run after the restart (a generate job
whose O-Voxel was stored only builds its asset again). A second signal skips the grace period. A worker still inside
a step STUCK_EXIT_S after that is left behind: the process exits at once with EXIT_WORKER_STUCK, its job queued.
"""

from __future__ import annotations

import argparse
import enum
import logging
import os
import platform
import queue
import signal
import socket
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import zmq

import backend
from backend.errors import JobFailure
from backend.server.auth import SecurityError, secure_server_socket, server_keys_for
from backend.server.peers import MAX_OUTBOX, InFlight, Peer, Peers, Subscriptions
from backend.server.requests import JobSpec
from backend.server.pool import PoolConfig, QueuedJob, build_pool
from backend.server.store import JobRecord, JobStore, StoreError, Terminal
from backend.server.worker import MODEL_NOT_READY_HINT
from protocol import (DEFAULT_LIMITS, PROTOCOL_VERSION, Accepted, Cancel, Cancelled, Error, ErrorCode, Fetch, Hello,
                      Info, InvalidSettings, Limits, MalformedMessage, Message, ModelStatus, Ping, Pong, Progress,
                      ProtocolError, Reprocess, Request, Texture, configure_socket, decode, encode, split_envelope)
from protocol.settings import DEFAULT_WEIGHTS

if TYPE_CHECKING:
    from backend.engine import AssetBuilder, Engine

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:5555"
SERVER_NAME = "trellis2-backend"
POLL_MS = 250  # the loop also wakes this often to notice stop requests and run the purge timer
OUTBOX_POLL_MS = 20  # while endings wait for a client's send budget
READ_BATCH = 64  # requests read per wake-up before worker events get their turn
PURGE_INTERVAL_S = 600.0
STUCK_EXIT_S = 10.0  # after interrupting, how long to wait for a worker stuck in a step without progress calls
EXIT_WORKER_STUCK = 3  # `serve`'s exit status when it left a stuck worker behind (its job stays queued)
RCVHWM = 4  # whole messages libzmq queues per connection before it stops reading it (back-pressure, no loss)
SNDHWM = 256  # messages queued per connection; a full queue drops progress and defers endings
MAX_TEXT = 2000  # the longest free text (a load error) put in `info`
GiB, MiB = 1 << 30, 1 << 20
Route = bytes  # a connection's ROUTER identity


class Sent(enum.Enum):
    """What became of one send."""

    AS_IS = "as is"
    REPLACED = "replaced"  # a terminal message too large for the client went as an error saying so
    BUSY = "busy"  # the client's queue is full (it is not reading)
    FAILED = "failed"  # unencodable, or the client is gone


def default_store_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trellis2" / "jobs"


@dataclass(frozen=True)
class ServerConfig:
    bind: str = DEFAULT_BIND
    weights: str | None = None  # hub repo id or local folder; None: protocol.settings.DEFAULT_WEIGHTS
    device: str | None = None  # None: cuda if available, else cpu
    memory: str = "auto"  # auto | gpu | offload, see Trellis2Pipeline.from_pretrained
    store: Path = field(default_factory=default_store_dir)
    keys: Path | None = None  # CURVE key folder; None: protocol.keys.default_keys_dir()
    auth: bool = True  # False (loopback only): no CURVE, for debugging
    max_queue: int = 100  # waiting jobs; more are refused with queue_full
    store_max_bytes: int = 20 * GiB  # ended and queued jobs together
    store_max_age_s: float = 7 * 24 * 3600.0
    grace_s: float = 30.0  # how long a shutdown waits for the running job
    send_budget_bytes: int = 64 * MiB  # endings in flight to one client before further ones wait (peers.py)
    limits: Limits = DEFAULT_LIMITS  # what this server accepts (advertised in `info`)
    pool: PoolConfig = PoolConfig()  # who runs the jobs: one embedded worker, worker processes or a cluster


class ServerStartError(RuntimeError):
    pass


class Server:
    """`start()` (binds; raises SecurityError, StoreError or ServerStartError), then `serve()` until `stop()`."""

    def __init__(self, config: ServerConfig, load: Callable[[], Engine] | None = None) -> None:
        self.config = config
        self._load = load or partial(_load_engine, config.weights, config.device, config.memory, None)
        self._events: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._followers = Subscriptions()
        self._last_progress: dict[str, Progress] = {}
        self._peers = Peers()
        self._stop_at: float | None = None  # monotonic deadline for the running job, once stopping
        self._resources = ExitStack()
        self.instance = uuid.uuid4().hex[:16]  # new at every start: clients see a restart in the next pong
        self.endpoint = ""

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Open the store, bind, start the worker (which loads the models); returns the bound endpoint."""
        keys = server_keys_for(self.config.bind, self.config.keys, self.config.auth)
        self.model_name = self.config.weights or DEFAULT_WEIGHTS
        self.secure = keys is not None
        try:  # everything opened here is closed in reverse order by close()
            self.store = JobStore(self.config.store, self.config.store_max_bytes, self.config.store_max_age_s)
            self._resources.callback(self.store.close)
            self._ctx = zmq.Context()
            self._resources.callback(self._ctx.term)
            self._sock = self._ctx.socket(zmq.ROUTER)
            self._resources.callback(self._sock.close)
            configure_socket(self._sock, self.config.limits, "server")
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a departed client fails instead of vanishing
            self._sock.setsockopt(zmq.RCVHWM, RCVHWM)
            self._sock.setsockopt(zmq.SNDHWM, SNDHWM)
            if keys is not None:
                self._resources.callback(secure_server_socket(self._ctx, self._sock, keys).stop)
            try:
                self._sock.bind(self.config.bind)
            except zmq.ZMQError as exc:
                raise ServerStartError(f"cannot listen on {self.config.bind}: {exc} (is another server running "
                                       f"there? pick another port with --bind)") from None
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._wake_r, self._wake_w = socket.socketpair()
            for end in (self._wake_r, self._wake_w):
                end.setblocking(False)
                self._resources.callback(end.close)
        except BaseException:
            self.close()
            raise
        self._versions = _versions()
        try:
            self.worker = build_pool(self.config.pool, self.store, self._emit, self._load, self.config.device)
        except ValueError as exc:
            self.close()
            raise ServerStartError(str(exc)) from None
        self._resources.callback(self.worker.close)
        self._requeue_pending()
        self.worker.start()
        log.info("listening on %s (%s); job store %s; instance %s", self.endpoint,
                 "CURVE, clients authenticated" if keys else "NO AUTHENTICATION (--no-auth)", self.config.store,
                 self.instance)
        return self.endpoint

    def serve(self) -> None:
        """The I/O loop; returns once stopped and the worker is done (or stuck past its grace)."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_purge = 0.0
        try:
            while not self._shutdown_done():
                try:
                    waiting = any(peer.outbox for _, peer in self._peers.items())
                    ready = dict(poller.poll(OUTBOX_POLL_MS if waiting else POLL_MS))
                    if self._sock in ready:
                        self._read_requests()
                    if self._wake_r.fileno() in ready:
                        self._drain_wake()
                    self._deliver_events()
                    self._flush_outboxes()
                    if time.monotonic() >= next_purge:
                        next_purge = time.monotonic() + PURGE_INTERVAL_S
                        self.store.purge()
                except Exception:  # a bug (or a full disk) costs this round, never the server
                    log.exception("the I/O loop hit an unexpected error; it goes on")
        finally:
            self.close()
        log.info("server stopped")

    def stop(self, immediate: bool = False) -> None:
        """Ask the loop to shut down (thread-safe, signal-safe). `immediate` skips the running job's grace."""
        deadline = time.monotonic() + (0.0 if immediate else self.config.grace_s)
        self._stop_at = deadline if self._stop_at is None else min(self._stop_at, deadline)
        self._wake()

    @property
    def stopping(self) -> bool:
        return self._stop_at is not None

    def close(self) -> None:
        self._resources.close()

    def _shutdown_done(self) -> bool:
        if self._stop_at is None:
            return False
        self.worker.stop()
        now = time.monotonic()
        if now >= self._stop_at:
            self.worker.interrupt()
        if not self.worker.is_alive():
            self._deliver_events()
            return True
        if now >= self._stop_at + STUCK_EXIT_S:
            log.warning("the worker is still busy in a step that cannot be interrupted; leaving it behind (its job "
                        "stays queued and runs after a restart)")
            return True
        return False

    def _requeue_pending(self) -> None:
        for record in self.store.pending():
            try:
                spec = JobSpec(record.kind, self.worker.schema.check(record.kind, record.settings),
                               record.source_job_id)
            except InvalidSettings as exc:  # settings this version no longer understands
                self.store.finish(record.job_id, Error.from_exception(exc, job_id=record.job_id))
                continue
            self.worker.submit(QueuedJob(record.job_id, spec))
            log.info("job %s re-queued from the store", record.job_id)

    # -- worker -> loop ---------------------------------------------------------------------------

    def _emit(self, msg: Message) -> None:
        """Called by the worker thread."""
        self._events.put(msg)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # buffer full: the loop is awake already; closed: it is gone
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _deliver_events(self) -> None:
        while True:
            try:
                msg = self._events.get_nowait()
            except queue.Empty:
                return
            job_id = msg.job_id
            if not msg.TERMINAL:
                self._last_progress[job_id] = msg
                for route in self._followers.of(job_id):
                    self._send(route, msg)
                continue
            self._last_progress.pop(job_id, None)
            for route in self._followers.end(job_id):
                self._deliver(route, job_id, msg)
            self._announce_positions()
            self.store.purge()

    # -- requests ---------------------------------------------------------------------------------

    def _read_requests(self) -> None:
        for _ in range(READ_BATCH):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        route: Route = frames[0].bytes
        try:
            identity, body = split_envelope(frames)
            if len(identity) != 1:  # only a proxy adds routing frames; a hostile peer could send huge ones
                raise MalformedMessage(f"{len(identity) - 1} routing frame(s) before the message",
                                       hint="connect a DEALER socket straight to the server and send "
                                            "[b'', *encode(msg)]")
            msg = decode(body, self.config.limits, sender="client")
            if self._peers.get(route) is not None:
                self._peers.heard(route)
            self._dispatch(route, _owner(frames[0]), msg)
        except ProtocolError as exc:
            log.warning("refused a message from client %s: %s", _who(route), exc)
            self._send(route, Error.from_exception(exc))
        except Exception:  # a bug here must cost one request, never the server
            log.exception("failed to handle a message from client %s", _who(route))
            self._send(route, Error(ErrorCode.INTERNAL_ERROR, "the server failed to handle this message",
                                    "the server log has the traceback; please report it"))

    def _dispatch(self, route: Route, owner: str, msg: Message) -> None:
        if isinstance(msg, Ping):
            peer = self._peers.get(route)
            self._send(route, Pong(msg.seq, self.instance, peer is not None and peer.greeted))
        elif isinstance(msg, Hello):
            peer = self._peers.heard(route)
            peer.limits, peer.owner, peer.greeted = msg.limits, owner, True
            log.debug("hello from client %s (%s %s)", _who(route), msg.client, msg.client_version)
            self._send(route, self._info(peer))
        elif isinstance(msg, Request):
            self._submit(route, owner, msg)
        elif isinstance(msg, Cancel):
            self._cancel(route, owner, msg.job_id)
        elif isinstance(msg, Fetch):
            self._fetch(route, owner, msg.job_id)

    def _info(self, peer: Peer) -> Info:
        """`info` for one client; library versions only for an authenticated one (they help an attacker)."""
        free, total = self.worker.gpu_memory
        load_error = self.worker.load_error[:MAX_TEXT] or None
        details = {"model_error": load_error, "store_jobs": len(self.store), "store_bytes": self.store.total_bytes(),
                   "curve": self.secure, "memory": self._memory()}
        authenticated = bool(peer.owner)
        if authenticated:
            details.update({**self._versions, **self.worker.versions})
        return Info(SERVER_NAME, backend.__version__ if authenticated else "", self.model_name, self.worker.status,
                    self.worker.device, self.worker.queue_length(), self.instance, free, total,
                    list(self.worker.capabilities), self.config.limits, details, self.worker.schema.to_wire(),
                    self.worker.workers())

    def _memory(self) -> dict[str, int | None]:
        return {"rss_bytes": _rss_bytes(), "sending_bytes": self._peers.in_flight(), "clients": len(self._peers)}

    def _submit(self, route: Route, owner: str, msg: Request) -> None:
        cid = msg.client_job_id

        def refuse(error: Error) -> None:
            log.info("submit from client %s (client job %s) refused: %s %s", _who(route), cid, error.code.value,
                     error.message)
            self._send(route, error)

        again = self.store.find(owner, cid)
        if again is not None:  # sent again after a restart or reconnect: the job it made already
            return self._accept_again(route, again)
        try:
            spec = JobSpec.of(msg, self.worker.schema)
        except InvalidSettings as exc:
            return refuse(Error.from_exception(exc, client_job_id=cid))
        except JobFailure as exc:  # a texture request's mesh that nothing could texture
            return refuse(Error(ErrorCode(exc.code), exc.message, exc.hint, None, cid))
        if self.worker.status == ModelStatus.FAILED:
            return refuse(Error(ErrorCode.MODEL_NOT_READY, f"the models failed to load: "
                                f"{self.worker.load_error[:MAX_TEXT]}",
                                MODEL_NOT_READY_HINT, None, cid))
        if self.worker.status == ModelStatus.READY and msg.KIND not in self.worker.capabilities:
            return refuse(Error(ErrorCode.UNSUPPORTED, f"this server does not run {msg.TYPE} requests",
                                f"it offers: {', '.join(self.worker.capabilities)}", None, cid))
        if isinstance(msg, Reprocess) and not (self._owned(owner, msg.source_job_id)
                                               and self.store.has_ovoxel(msg.source_job_id)):
            return refuse(Error(ErrorCode.UNKNOWN_JOB, f"job {msg.source_job_id} has no stored O-Voxel (unknown, "
                                f"failed, not finished yet, or purged)", "generate it again", None, cid))
        if len(self.worker.waiting()) >= self.config.max_queue:
            return refuse(Error(ErrorCode.QUEUE_FULL, f"{self.config.max_queue} jobs are waiting already",
                                "try again when the queue is shorter", None, cid))
        image = getattr(msg, "image", None)
        size = len(image or b"") + (sum(a.nbytes for a in msg.mesh.values()) if isinstance(msg, Texture) else 0)
        if not self.store.has_room(size):
            return refuse(Error(ErrorCode.QUEUE_FULL, f"the job store is full: queued inputs and kept results take "
                                f"{self.store.total_bytes()} of its {self.store.max_bytes} bytes",
                                "try again when queued jobs have run, or start the server with a larger "
                                "--store-max-gb", None, cid))
        job_id = uuid.uuid4().hex  # unguessable, and only its owner's clients may use it
        try:
            self.store.create(job_id, spec.kind, spec.settings, image=image,
                              mesh=msg.mesh if isinstance(msg, Texture) else None,
                              source_job_id=spec.source_job_id, client_job_id=cid, owner=owner)
        except OSError as exc:
            return refuse(Error(ErrorCode.INTERNAL_ERROR, f"the server could not store the job: {exc}",
                                "free disk space in the server's --store folder", None, cid))
        self._followers.add(job_id, route)
        position = self.worker.submit(QueuedJob(job_id, spec))
        self._send(route, Accepted(job_id, position, cid))
        log.info("job %s accepted from client %s (client job %s), queue position %d", job_id, _who(route), cid,
                 position)

    def _accept_again(self, route: Route, record: JobRecord) -> None:
        job_id = record.job_id
        self._send(route, Accepted(job_id, self._position(job_id), record.client_job_id))
        log.info("job %s: its submit came again from client %s (%s)", job_id, _who(route), record.state)
        if record.terminal:
            self._deliver(route, job_id)
        else:
            self._followers.add(job_id, route)

    def _owned(self, owner: str, job_id: str) -> JobRecord | None:
        """The job, if `owner` may see it: another owner's job is as unknown as a job never made."""
        record = self.store.get(job_id)
        return record if record is not None and record.owner == owner else None

    def _cancel(self, route: Route, owner: str, job_id: str) -> None:
        record = self._owned(owner, job_id)
        if record is None:
            self._send(route, _unknown_job(job_id))
            return
        if record.terminal:
            log.info("job %s: cancel from client %s came after its end", job_id, _who(route))
            self._deliver(route, job_id)
            return
        self._followers.add(job_id, route)
        where = self.worker.cancel(job_id)
        log.info("job %s: cancel from client %s (%s)", job_id, _who(route), where or "not held by the worker")
        if where == "queued" and self.store.finish(job_id, Cancelled(job_id)):
            log.info("job %s cancelled while queued", job_id)
            self._last_progress.pop(job_id, None)
            for follower in self._followers.end(job_id):
                self._deliver(follower, job_id, Cancelled(job_id))
            self._announce_positions()

    def _fetch(self, route: Route, owner: str, job_id: str) -> None:
        record = self._owned(owner, job_id)
        if record is None:
            self._send(route, _unknown_job(job_id))
        elif record.terminal:
            self._deliver(route, job_id)
        else:
            self._followers.add(job_id, route)
            ahead = self._position(job_id)
            self._send(route, self._last_progress.get(job_id) or Progress(
                job_id, "queued", 0, 0, 0.0, f"{ahead} job(s) ahead" if ahead else ""))
        log.info("job %s fetched by client %s (%s)", job_id, _who(route), record.state if record else "unknown")

    def _position(self, job_id: str) -> int:
        """Jobs ahead of `job_id` (0 while it runs, or once it has ended)."""
        waiting = self.worker.waiting()
        if job_id not in waiting:
            return 0
        return waiting.index(job_id) + len(self.worker.running())

    def _announce_positions(self) -> None:
        """Tell waiting clients how many jobs are ahead of theirs now."""
        ahead = len(self.worker.running())
        for i, job_id in enumerate(self.worker.waiting()):
            for route in self._followers.of(job_id):
                self._send(route, Progress(job_id, "queued", 0, 0, 0.0, f"{ahead + i} job(s) ahead"))

    # -- sending ----------------------------------------------------------------------------------

    def _deliver(self, route: Route, job_id: str, msg: Terminal | None = None) -> None:
        """Send a job's ending to one client within its send budget (peers.py), else queue it by id; `msg` is the
        ending if at hand, else it is read from the store when its turn comes."""
        peer = self._peers.heard(route)
        if peer.has_ending(job_id):
            log.debug("job %s: ending already on its way to client %s; coalesced", job_id, _who(route))
            return
        if peer.outbox or peer.in_flight() >= self.config.send_budget_bytes:
            if len(peer.outbox) >= MAX_OUTBOX:
                log.warning("job %s: dropped its ending for client %s, which has %d waiting (it is not reading)",
                            job_id, _who(route), len(peer.outbox))
                return
            peer.outbox[job_id] = None
            return
        self._send_ending(route, peer, job_id, msg)

    def _flush_outboxes(self) -> None:
        for route, peer in self._peers.items():
            while peer.outbox and peer.in_flight() < self.config.send_budget_bytes:
                job_id = next(iter(peer.outbox))
                del peer.outbox[job_id]
                if not self._send_ending(route, peer, job_id):
                    break

    def _send_ending(self, route: Route, peer: Peer, job_id: str, msg: Terminal | None = None) -> bool:
        """False when the client's queue is full (the ending waits in its outbox again) or it is gone."""
        ending = msg or self.store.terminal(job_id) or _unknown_job(job_id)  # purged meanwhile
        sent = self._send(route, ending)
        if sent is Sent.AS_IS:
            self.store.mark_delivered(job_id)
            log.info("job %s %s delivered to client %s", job_id, ending.TYPE, _who(route))
        elif sent is Sent.BUSY:
            peer.outbox = {job_id: None, **peer.outbox}
        return sent in (Sent.AS_IS, Sent.REPLACED)

    def _send(self, route: Route, msg: Message) -> Sent:
        """Encode within the client's limits and send without blocking; never raises. A terminal message the client
        could not take is replaced by an error saying why; zero-copy frames count toward its send budget."""
        peer = self._peers.get(route)
        limits = peer.limits if peer is not None else DEFAULT_LIMITS
        outcome = Sent.AS_IS
        try:
            frames = encode(msg, limits)
        except ProtocolError as exc:
            if not msg.TERMINAL or isinstance(msg, Error):
                log.error("could not encode %s for client %s: %s", msg.TYPE, _who(route), exc)
                return Sent.FAILED
            log.warning("job %s: %s too large for client %s: %s", msg.job_id, msg.TYPE, _who(route), exc)
            try:
                frames = encode(Error.from_exception(exc, job_id=msg.job_id), limits)
            except ProtocolError as again:
                log.error("could not encode the error for client %s either: %s", _who(route), again)
                return Sent.FAILED
            outcome = Sent.REPLACED
        tracked = [zmq.Frame(f, track=True) if memoryview(f).nbytes >= zmq.COPY_THRESHOLD else f for f in frames]
        try:
            self._sock.send_multipart([route, b"", *tracked], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("client %s is not reading: %s %s", _who(route), "deferred its" if msg.TERMINAL else
                        "dropped a", msg.TYPE)
            return Sent.BUSY
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                log.debug("could not send a %s to client %s: it has disconnected", msg.TYPE, _who(route))
                self._peers.forget(route)
                self._followers.drop_route(route)
            else:
                log.error("could not send a %s to client %s: %s", msg.TYPE, _who(route), exc)
            return Sent.FAILED
        big = [f for f in tracked if isinstance(f, zmq.Frame)]
        if big and peer is not None:
            peer.sending.append(InFlight(getattr(msg, "job_id", None), sum(len(f) for f in big),
                                         [f.tracker for f in big]))
        return outcome


def _unknown_job(job_id: str) -> Error:
    return Error(ErrorCode.UNKNOWN_JOB, f"no job {job_id} on this server (never submitted here, purged, or "
                 f"another client's)", "submit the image again", job_id)


def _owner(frame: zmq.Frame) -> str:
    """The client's CURVE public key as the authenticator recorded it; "" without authentication."""
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:
        return ""


def _who(route: Route) -> str:
    return route.hex()[:10] if route else "?"


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux), for `info`."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _versions() -> dict[str, object]:
    return {"protocol": PROTOCOL_VERSION, "python": platform.python_version(), "numpy": np.__version__,
            "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version()}


def _load_engine(weights: str | None, device: str | None, memory: str, build_asset: AssetBuilder | None) -> Engine:
    """The worker's loader: imports torch and the models on the worker thread, never on the I/O thread."""
    from backend.engine import load_engine

    return load_engine(weights, device, memory, build_asset)


# -- command line -------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the ZeroMQ job server (models load in the background)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--bind", default=DEFAULT_BIND, help="ZeroMQ endpoint (default: %(default)s); a non-loopback "
                   "address needs client keys made with `python -m backend keys`")
    p.add_argument("--weights", default=None, help="hub repo id or local folder (default: microsoft/TRELLIS.2-4B)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--memory", choices=("auto", "gpu", "offload"), default="auto",
                   help="keep all models on the GPU, move them in per stage, or decide from free memory")
    p.add_argument("--store", type=Path, default=default_store_dir(), help="job store folder (default: %(default)s)")
    p.add_argument("--keys", type=Path, default=None, help="CURVE key folder (default: ~/.config/trellis2/keys; "
                   "made on first start for a loopback bind)")
    p.add_argument("--no-auth", action="store_true", help="no encryption, no client authentication: any local user "
                   "may connect (loopback binds only; for debugging)")
    p.add_argument("--max-queue", type=int, default=ServerConfig.max_queue, help="waiting jobs (default: %(default)s)")
    p.add_argument("--store-max-gb", type=float, default=ServerConfig.store_max_bytes / GiB,
                   help="job store size cap (default: %(default)s)")
    p.add_argument("--store-max-days", type=float, default=ServerConfig.store_max_age_s / 86400,
                   help="ended jobs older than this are purged (default: %(default)s)")
    p.add_argument("--grace", type=float, default=ServerConfig.grace_s,
                   help="seconds a shutdown waits for the running job before leaving it queued (default: %(default)s)")
    workers = p.add_argument_group("workers", "who runs the jobs (default: one worker inside the server process)")
    workers.add_argument("--gpus", metavar="all|0,1,...", help="a worker process per GPU: `all`, or GPU indices")
    workers.add_argument("--workers", type=int, metavar="N", help="N worker processes on the one --device (or N "
                         "cluster actors with --cluster)")
    workers.add_argument("--cluster", nargs="?", const="local", metavar="ADDRESS", help="workers on a Ray cluster: "
                         "HEAD:6379 joins one started with `ray start`; no ADDRESS starts a private one on loopback "
                         "(needs the cluster extra)")
    workers.add_argument("--overlap", action="store_true", help="start a job's generation while the previous job's "
                         "asset step runs on the same GPU, when its free memory allows")
    workers.add_argument("--hang-timeout", type=float, default=PoolConfig.hang_timeout_s, help="seconds without a "
                         "heartbeat before a worker process is killed and restarted (default: %(default)s)")
    workers.add_argument("--step-timeout", type=float, default=PoolConfig.step_timeout_s, help="seconds a job may "
                         "go without progress before its worker is killed and restarted (default: %(default)s)")
    p.set_defaults(run=serve_command)


def serve_command(args: argparse.Namespace, build_asset: AssetBuilder | None = None) -> int:
    """Run `serve`; `build_asset` replaces the asset step (test launchers)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(bind=args.bind, weights=args.weights, device=args.device, memory=args.memory,
                          store=args.store, keys=args.keys, auth=not args.no_auth, max_queue=args.max_queue,
                          store_max_bytes=int(args.store_max_gb * GiB), store_max_age_s=args.store_max_days * 86400,
                          grace_s=args.grace,
                          pool=PoolConfig(args.gpus, args.workers, args.cluster, args.overlap, args.hang_timeout,
                                          args.step_timeout))
    server = Server(config, partial(_load_engine, args.weights, args.device, args.memory, build_asset))
    try:
        server.start()
    except (SecurityError, StoreError, ServerStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: %s", signal.Signals(signum).name,
                 "stopping now" if server.stopping else f"stopping (the running job gets {config.grace_s:g} s)")
        server.stop(immediate=server.stopping)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.serve()
    if server.worker.is_alive():
        # Python's own exit would tear down the interpreter under a thread still inside a torch op, which aborts
        # the process (SIGABRT, "terminate called without an active exception"); leave at once instead. The store
        # is closed, and the interrupted job is still queued in it.
        log.error("exiting with status %d: the worker did not stop within %g s of the grace period", EXIT_WORKER_STUCK,
                  STUCK_EXIT_S)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_WORKER_STUCK)
    return 0


def main(argv: list[str] | None = None, build_asset: AssetBuilder | None = None) -> int:
    """`serve` without backend/__main__.py: `python -c "from backend.server.server import main; main()" --bind ...`"""
    parser = argparse.ArgumentParser(prog="python -m backend")
    register(parser.add_subparsers(dest="command", required=True))
    return serve_command(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]), build_asset)
