"""`python -m backend serve`: the ZeroMQ job server. One ROUTER socket, served by an I/O loop that never waits for
the GPU.

Threads: the I/O loop (this module, the only user of the socket), the worker pool's supervisors (pool.py: one per
worker, which runs on a thread here, in a process of its own or on a cluster) and, with CURVE, pyzmq's
authenticator. The pool hands its messages over through a queue and wakes the loop through a socket pair, so a
ping is answered at once even while jobs run. Every job is in the on-disk store (store.py) before its `accepted`
is sent; its events go to the client that submitted it, or last fetched or cancelled it; its one terminal message is
recorded before it is sent, so a client that went away collects it later with `fetch`, also after a restart.

Shutdown (SIGINT/SIGTERM, or `stop()`): no new job starts; the running one gets `--grace` seconds to finish, then is
stopped at its next step and left queued on disk, like every waiting job: they run after the restart. A second
signal skips the grace period.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import queue
import signal
import socket
import sys
import time
import uuid
from collections import OrderedDict
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
from backend.server.requests import JobSpec
from backend.server.store import JobStore, StoreError, Terminal
from backend.server.pool import PoolConfig, QueuedJob, build_pool
from protocol import (DEFAULT_LIMITS, PROTOCOL_VERSION, Accepted, Cancel, Cancelled, Error, ErrorCode, Fetch, Hello,
                      Info, InvalidSettings, Limits, Message, ModelStatus, Ping, Pong, Progress, ProtocolError,
                      Reprocess, Request, Texture, configure_socket, decode, encode, join_envelope, split_envelope)
from protocol.settings import DEFAULT_WEIGHTS

if TYPE_CHECKING:
    from backend.engine import AssetBuilder, Engine

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:5555"
SERVER_NAME = "trellis2-backend"
POLL_MS = 250  # the loop also wakes this often to notice stop requests and run the purge timer
READ_BATCH = 64  # requests read per wake-up before worker events get their turn
PURGE_INTERVAL_S = 600.0
MAX_PEERS = 4096  # remembered clients' limits; the oldest are forgotten (they fall back to the defaults)
STUCK_EXIT_S = 10.0  # after interrupting, how long to wait for a worker stuck in a step without progress calls
GiB = 1 << 30
Route = tuple[bytes, ...]


def default_store_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trellis2" / "jobs"


@dataclass(frozen=True)
class ServerConfig:
    bind: str = DEFAULT_BIND
    weights: str | None = None  # hub repo id or local folder; None: protocol.settings.DEFAULT_WEIGHTS
    device: str | None = None  # None: cuda if available, else cpu
    memory: str = "auto"  # auto | gpu | offload, see Trellis2Pipeline.from_pretrained
    store: Path = field(default_factory=default_store_dir)
    keys: Path | None = None  # CURVE key folder; required for non-loopback binds
    max_queue: int = 100  # waiting jobs; more are refused with queue_full
    store_max_bytes: int = 20 * GiB
    store_max_age_s: float = 7 * 24 * 3600.0
    grace_s: float = 30.0  # how long a shutdown waits for the running job
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
        self._routes: dict[str, Route] = {}  # job -> the client its events go to
        self._last_progress: dict[str, Progress] = {}
        self._peers: OrderedDict[Route, Limits] = OrderedDict()  # client -> the limits it said it accepts
        self._stop_at: float | None = None  # monotonic deadline for the running job, once stopping
        self._resources = ExitStack()
        self.endpoint = ""

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Open the store, bind, start the worker (which loads the models); returns the bound endpoint."""
        keys = server_keys_for(self.config.bind, self.config.keys)
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
        log.info("listening on %s (%s); job store %s", self.endpoint,
                 "CURVE, clients authenticated" if keys else "loopback only, no encryption", self.config.store)
        return self.endpoint

    def serve(self) -> None:
        """The I/O loop; returns once stopped and the worker is done (or stuck past its grace)."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_purge = 0.0
        try:
            while not self._shutdown_done():
                ready = dict(poller.poll(POLL_MS))
                if self._sock in ready:
                    self._read_requests()
                if self._wake_r.fileno() in ready:
                    self._drain_wake()
                self._deliver_events()
                if time.monotonic() >= next_purge:
                    self.store.purge()
                    next_purge = time.monotonic() + PURGE_INTERVAL_S
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
            log.warning("the worker is still busy in a step that cannot be interrupted; exiting anyway (its job "
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
                if job_id in self._routes:
                    self._send(self._routes[job_id], msg)
                continue
            self._last_progress.pop(job_id, None)
            route = self._routes.pop(job_id, None)
            if route is not None:
                self._deliver(route, msg)
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
        route: Route = (frames[0].bytes,)
        try:
            identity, body = split_envelope(frames)
            route = tuple(frame.bytes for frame in identity)
            self._dispatch(route, decode(body, self.config.limits, sender="client"))
        except ProtocolError as exc:
            log.warning("refused a message from client %s: %s", _peer(route), exc)
            self._send(route, Error.from_exception(exc))
        except Exception:  # a bug here must cost one request, never the server
            log.exception("failed to handle a message from client %s", _peer(route))
            self._send(route, Error(ErrorCode.INTERNAL_ERROR, "the server failed to handle this message",
                                    "the server log has the traceback; please report it"))

    def _dispatch(self, route: Route, msg: Message) -> None:
        if isinstance(msg, Ping):
            self._send(route, Pong(msg.seq))
        elif isinstance(msg, Hello):
            self._peers[route] = msg.limits
            self._peers.move_to_end(route)
            while len(self._peers) > MAX_PEERS:
                self._peers.popitem(last=False)
            log.debug("hello from client %s (%s %s)", _peer(route), msg.client, msg.client_version)
            self._send(route, self._info())
        elif isinstance(msg, Request):
            self._submit(route, msg)
        elif isinstance(msg, Cancel):
            self._cancel(route, msg.job_id)
        elif isinstance(msg, Fetch):
            self._fetch(route, msg.job_id)

    def _info(self) -> Info:
        free, total = self.worker.gpu_memory
        details = {**self._versions, **self.worker.versions, "model_error": self.worker.load_error or None, "store_jobs": len(self.store),
                   "store_bytes": self.store.total_bytes(), "curve": self.secure}
        return Info(SERVER_NAME, backend.__version__, self.model_name, self.worker.status, self.worker.device,
                    self.worker.queue_length(), free, total, list(self.worker.capabilities), self.config.limits,
                    details, self.worker.schema.to_wire(), self.worker.workers())

    def _submit(self, route: Route, msg: Request) -> None:
        cid = msg.client_job_id

        def refuse(error: Error) -> None:
            log.info("submit from client %s (client job %s) refused: %s %s", _peer(route), cid, error.code.value,
                     error.message)
            self._send(route, error)

        try:
            spec = JobSpec.of(msg, self.worker.schema)
        except InvalidSettings as exc:
            return refuse(Error.from_exception(exc, client_job_id=cid))
        except JobFailure as exc:  # a texture request's mesh that nothing could texture
            return refuse(Error(ErrorCode(exc.code), exc.message, exc.hint, None, cid))
        if self.worker.status == ModelStatus.FAILED:
            return refuse(Error(ErrorCode.MODEL_NOT_READY, f"the models failed to load: {self.worker.load_error}",
                                "fix the cause shown in the server log and restart the server", None, cid))
        if self.worker.status == ModelStatus.READY and msg.KIND not in self.worker.capabilities:
            return refuse(Error(ErrorCode.UNSUPPORTED, f"this server does not run {msg.TYPE} requests",
                                f"it offers: {', '.join(self.worker.capabilities)}", None, cid))
        if isinstance(msg, Reprocess) and not self.store.has_ovoxel(msg.source_job_id):
            return refuse(Error(ErrorCode.UNKNOWN_JOB, f"job {msg.source_job_id} has no stored O-Voxel (unknown, "
                                f"failed, not finished yet, or purged)", "generate it again", None, cid))
        if len(self.worker.waiting()) >= self.config.max_queue:
            return refuse(Error(ErrorCode.QUEUE_FULL, f"{self.config.max_queue} jobs are waiting already",
                                "try again when the queue is shorter", None, cid))
        job_id = uuid.uuid4().hex  # unguessable: knowing a job id is what entitles a client to its result
        try:
            self.store.create(job_id, spec.kind, spec.settings, image=getattr(msg, "image", None),
                              mesh=msg.mesh if isinstance(msg, Texture) else None,
                              source_job_id=spec.source_job_id, client_job_id=cid)
        except OSError as exc:
            return refuse(Error(ErrorCode.INTERNAL_ERROR, f"the server could not store the job: {exc}",
                                "free disk space in the server's --store folder", None, cid))
        self._routes[job_id] = route
        position = self.worker.submit(QueuedJob(job_id, spec))
        self._send(route, Accepted(job_id, position, cid))
        log.info("job %s accepted from client %s (client job %s), queue position %d", job_id, _peer(route), cid,
                 position)

    def _cancel(self, route: Route, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None:
            self._send(route, _unknown_job(job_id))
            return
        if record.terminal:
            log.info("job %s: cancel from client %s ignored, the job has ended", job_id, _peer(route))
            return
        self._routes[job_id] = route
        where = self.worker.cancel(job_id)
        log.info("job %s: cancel from client %s (%s)", job_id, _peer(route), where or "not held by the worker")
        if where == "queued" and self.store.finish(job_id, Cancelled(job_id)):
            log.info("job %s cancelled while queued", job_id)
            self._routes.pop(job_id)
            self._last_progress.pop(job_id, None)
            self._deliver(route, Cancelled(job_id))
            self._announce_positions()

    def _fetch(self, route: Route, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None:
            self._send(route, _unknown_job(job_id))
        elif record.terminal:
            self._routes.pop(job_id, None)  # the fetching client takes the job over, also an undelivered ending
            self._deliver(route, self.store.terminal(job_id))
        else:
            self._routes[job_id] = route
            self._send(route, self._last_progress.get(job_id) or Progress(job_id, "queued", 0, 0, 0.0))
        log.info("job %s fetched by client %s (%s)", job_id, _peer(route), record.state if record else "unknown")

    def _announce_positions(self) -> None:
        """Tell waiting clients how many jobs are ahead of theirs now."""
        ahead = len(self.worker.running())
        for i, job_id in enumerate(self.worker.waiting()):
            if job_id in self._routes:
                self._send(self._routes[job_id], Progress(job_id, "queued", 0, 0, 0.0, f"{ahead + i} job(s) ahead"))

    # -- sending ----------------------------------------------------------------------------------

    def _deliver(self, route: Route, msg: Terminal) -> None:
        if self._send(route, msg):
            self.store.mark_delivered(msg.job_id)
            log.info("job %s %s delivered to client %s", msg.job_id, msg.TYPE, _peer(route))

    def _send(self, route: Route, msg: Message) -> bool:
        """Encode within the client's limits and send without blocking. True when `msg` itself went out; a
        terminal message the client could not take is replaced by an error saying why."""
        limits = self._peers.get(route, DEFAULT_LIMITS)
        sent_as_is = True
        try:
            frames = encode(msg, limits)
        except ProtocolError as exc:
            if not msg.TERMINAL:
                log.error("could not encode %s for client %s: %s", msg.TYPE, _peer(route), exc)
                return False
            log.warning("job %s: %s too large for client %s: %s", msg.job_id, msg.TYPE, _peer(route), exc)
            frames, sent_as_is = encode(Error.from_exception(exc, job_id=msg.job_id), limits), False
        try:
            self._sock.send_multipart(join_envelope(route, frames), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("dropped a %s for client %s (it is not reading)", msg.TYPE, _peer(route))
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            log.debug("could not send a %s to client %s: it has disconnected", msg.TYPE, _peer(route))
            return False
        return sent_as_is


def _unknown_job(job_id: str) -> Error:
    return Error(ErrorCode.UNKNOWN_JOB, f"no job {job_id} on this server (never submitted here, or purged)",
                 "submit the image again", job_id)


def _peer(route: Route) -> str:
    return route[-1].hex()[:10] if route else "?"


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
                   "address needs CURVE keys, see `python -m backend keys`")
    p.add_argument("--weights", default=None, help="hub repo id or local folder (default: microsoft/TRELLIS.2-4B)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--memory", choices=("auto", "gpu", "offload"), default="auto",
                   help="keep all models on the GPU, move them in per stage, or decide from free memory")
    p.add_argument("--store", type=Path, default=default_store_dir(), help="job store folder (default: %(default)s)")
    p.add_argument("--keys", type=Path, default=None, help="CURVE key folder: turns on encryption and client "
                   "authentication (default for non-loopback binds: ~/.config/trellis2/keys)")
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
                          store=args.store, keys=args.keys, max_queue=args.max_queue,
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
    return 0


def main(argv: list[str] | None = None, build_asset: AssetBuilder | None = None) -> int:
    """`serve` without backend/__main__.py: `python -c "from backend.server.server import main; main()" --bind ...`"""
    parser = argparse.ArgumentParser(prog="python -m backend")
    register(parser.add_subparsers(dest="command", required=True))
    return serve_command(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]), build_asset)
