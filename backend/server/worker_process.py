"""A worker in a process of its own (`serve --gpus`, `serve --workers N`): the server's side and the child's.

The child is started fresh (multiprocessing's "spawn": nothing of the server's threads or sockets is inherited),
sees only its own GPU (CUDA_VISIBLE_DEVICES is set before torch first touches CUDA), loads the engine and runs an
`EngineWorker`. Two one-way pipes connect it to its supervisor: commands in, events out (pickled). It ignores SIGINT
and SIGTERM, so a Ctrl-C or a service manager's stop reaches only the server, which winds its workers down itself;
and it exits as soon as the server's end of the command pipe closes, so it never outlives the server.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import threading
from multiprocessing.connection import Connection, wait

from backend.server.worker import EngineWorker, Event, JobOrder, Loader, WorkerLost

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # spawn, imports and unpickling the loader, before its first heartbeat
LOG_FORMAT = "%(asctime)s %(levelname)s {name} %(name)s: %(message)s"


class ProcessTransport:
    """The server's end of one worker process."""

    killable = True
    start_timeout_s = START_TIMEOUT_S

    def __init__(self, name: str, load: Loader, overlap: bool, gpu: str | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._events, child_events = ctx.Pipe(duplex=False)
        # The loader travels pickled, so the child sets CUDA_VISIBLE_DEVICES before anything it names is imported.
        self._process = ctx.Process(target=child_main, name=f"trellis2-worker-{name}", daemon=True,
                                    args=(child_commands, child_events, pickle.dumps(load), overlap, gpu, name))
        self._process.start()
        child_commands.close()
        child_events.close()
        self._lock = threading.Lock()  # the supervisor sends orders, the I/O thread cancels

    def run(self, order: JobOrder) -> None:
        self._send("run", order)

    def cancel(self, job_id: str) -> None:
        self._send("cancel", job_id)

    def interrupt(self) -> None:
        self._send("interrupt")

    def _send(self, *command: object) -> None:
        with self._lock:
            try:
                self._commands.send(command)
            except OSError:  # it has died: receive() says so
                pass

    def receive(self, timeout: float) -> list[Event]:
        """Its events, waiting up to `timeout` for the first; once it has exited and said all it had, WorkerLost."""
        wait([self._events, self._process.sentinel], timeout)
        events: list[Event] = []
        try:
            while self._events.poll():
                events.append(self._events.recv())
        except (EOFError, OSError):
            pass
        if not events and not self._process.is_alive():
            raise WorkerLost(exit_reason(self._process.exitcode))
        return events

    def kill(self) -> None:
        self._process.kill()
        self._process.join(10)
        self._close_pipes()

    def close(self, timeout: float) -> None:
        self._send("stop")
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("worker process %d did not stop within %g s; killing it", self._process.pid, timeout)
            self._process.kill()
            self._process.join(10)
        self._close_pipes()

    def _close_pipes(self) -> None:
        with self._lock:
            self._commands.close()
            self._events.close()


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def child_main(commands: Connection, events: Connection, load_pickle: bytes, overlap: bool, gpu: str | None,
               name: str) -> None:
    """The worker process: obey commands until told to stop or until the server goes away."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT.format(name=f"[worker {name}]"))
    lock = threading.Lock()

    def outbox(event: Event) -> None:
        with lock:
            try:
                events.send(event)
            except OSError:  # the server is gone
                os._exit(0)

    worker = EngineWorker(name, pickle.loads(load_pickle), outbox, overlap)
    worker.start()
    while True:
        try:
            command, *args = commands.recv()
        except (EOFError, OSError):
            os._exit(0)  # the server is gone: never outlive it
        if command == "stop":
            worker.close(5.0)
            return
        getattr(worker, command)(*args)


def visible_gpus(spec: str) -> list[str]:
    """The GPUs `--gpus` names: "all" (those CUDA_VISIBLE_DEVICES allows, else every one nvidia-smi lists) or a
    comma-separated list of indices or UUIDs. Raises ValueError saying what to do."""
    if spec != "all":
        gpus = [g.strip() for g in spec.split(",")]
        if not all(gpus) or len(set(gpus)) != len(gpus):
            raise ValueError(f"--gpus {spec!r}: give `all` or distinct GPU indices separated by commas, e.g. 0,1")
        return gpus
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    elif shutil.which("nvidia-smi"):
        run = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        gpus = [line.strip() for line in run.stdout.splitlines() if line.strip()] if run.returncode == 0 else []
    else:
        gpus = []
    if not gpus:
        raise ValueError("--gpus all: no NVIDIA GPU found (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES is empty); "
                         "on a CPU-only machine use --device cpu --workers N")
    return gpus
