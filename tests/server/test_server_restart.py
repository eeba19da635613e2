"""The server as an operator runs it, in its own process, restarted under waiting clients.

The soak: three clients wait for their jobs while the server is killed (-9) and restarted, then stopped with SIGTERM
and a one-second grace and restarted again, on the same store and address; every client follows through ("backend
restarted, resuming") and gets its job's ending, exactly once. Then a worker stuck in a step that never calls back:
shutdown leaves it behind with EXIT_WORKER_STUCK instead of aborting, the job stays queued, and the restart builds
its asset from the stored O-Voxel without generating again. Bounded in time: server starts (~7 s each on a loaded
2-core machine) dominate; the whole module stays well under a minute there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from backend.server.server import EXIT_WORKER_STUCK
from protocol import Generate, Notice, Result
from protocol.client import RESTARTED
from server_testkit import FAST_ASSET, connect, png, wait_for_stage, wait_until

REPO = Path(__file__).resolve().parents[2]
LAUNCH = "import sys; from backend.server.server import main; sys.exit(main())"
# A launcher whose asset step sleeps without calling progress (an uninterruptible step), and that waits only a second
# for it after the grace.
STUCK_LAUNCH = """import sys, time
import backend.server.server as server
server.STUCK_EXIT_S = 1.0
def stuck(ovoxel, settings, progress):
    progress("reference", 0, 1)
    time.sleep(600)
sys.exit(server.main(build_asset=stuck))"""
SOAK = {"pipeline_type": "512", "sparse_structure_steps": 4, "shape_steps": 4, "texture_steps": 4, **FAST_ASSET}
WAITING = {"resume_for": 60.0, "heartbeat_interval": 0.3, "dead_after": 2.0}


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class ServerProcess:
    def __init__(self, weights: Path, store: Path, log: Path, address: str, *extra: str,
                 launch: str = LAUNCH) -> None:
        self.log, self.endpoint = log, address
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see the note in conftest.py
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", launch, "--bind", address, "--weights", str(weights), "--device", "cpu",
                 "--store", str(store), *extra], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: "listening on" in self.text() or self.proc.poll() is not None, 60, "the server to start")
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        return self.log.read_text()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_waiting_clients_get_their_endings_through_kill_and_sigterm_restarts(tiny_weights, tmp_path):
    address, store = free_address(), tmp_path / "store"
    accepted = threading.Semaphore(0)
    outcomes: dict[int, list] = {}
    failures: list[BaseException] = []

    def wait_for_a_job(k: int) -> None:
        try:
            with connect(address, **WAITING) as client:
                client.hello()
                job_id = client.submit(Generate(png(k), {"seed": k, **SOAK}))
                accepted.release()
                outcomes[k] = [job_id, *client.events(job_id, timeout=150)]
        except BaseException as exc:
            failures.append(exc)
            accepted.release()

    server = ServerProcess(tiny_weights, store, tmp_path / "run1.log", address, "--grace", "1")
    logs = [server.log]
    clients = [threading.Thread(target=wait_for_a_job, args=(k,)) for k in range(3)]
    try:
        for thread in clients:
            thread.start()
        for _ in clients:
            assert accepted.acquire(timeout=60)
        wait_until(lambda: " started" in server.text(), 60, "a job to start")
        server.kill()  # kill -9: nothing is flushed, nothing is said

        server = ServerProcess(tiny_weights, store, tmp_path / "run2.log", address, "--grace", "1")
        logs.append(server.log)
        wait_until(lambda: " started" in server.text(), 60, "a job to start after the restart")
        assert server.terminate() == 0  # SIGTERM: the running job gets a second, then stays queued

        server = ServerProcess(tiny_weights, store, tmp_path / "run3.log", address, "--grace", "30")
        logs.append(server.log)
        for thread in clients:
            thread.join(150)
        assert server.terminate() == 0
    finally:
        server.kill()
    assert not failures, failures
    for k, (job_id, *events) in outcomes.items():
        endings = [m for m in events if m.TERMINAL]
        assert len(endings) == 1 and isinstance(endings[0], Result), (k, endings)
        assert endings[0].job_id == job_id and endings[0].metadata["settings"]["seed"] == k
        assert Notice(job_id, RESTARTED) in events, "the client said it followed a restart"
    assert len(outcomes) == len(clients)
    for log in logs:
        assert "terminate called" not in log.read_text()
    assert " re-queued from the store" in logs[1].read_text() and " re-queued from the store" in logs[2].read_text()


def test_a_stuck_worker_is_left_behind_and_its_job_resumes_from_the_ovoxel(tiny_weights, tmp_path):
    address, store = free_address(), tmp_path / "store"
    stuck = ServerProcess(tiny_weights, store, tmp_path / "stuck.log", address, "--grace", "0",
                          launch=STUCK_LAUNCH)
    try:
        with connect(address) as client:
            client.hello()
            job_id = client.submit(Generate(png(), {"seed": 7, **FAST_ASSET}))
            wait_for_stage(client, job_id, "reference")
            assert stuck.terminate() == EXIT_WORKER_STUCK
    finally:
        stuck.kill()
    text = stuck.text()
    assert f"exiting with status {EXIT_WORKER_STUCK}" in text and "terminate called" not in text
    assert (store / "jobs" / job_id / "ovoxel.npz").is_file()

    again = ServerProcess(tiny_weights, store, tmp_path / "again.log", address, "--grace", "30")
    try:
        with connect(address) as client:
            client.hello()
            ending = client.fetch(job_id, timeout=90)
        assert again.terminate() == 0
    finally:
        again.kill()
    assert isinstance(ending, Result) and ending.metadata["settings"]["seed"] == 7
    text = again.text()
    assert f"job {job_id} resumes from its stored O-Voxel" in text
    assert f"job {job_id} stage bake" in text and f"job {job_id} stage sparse_structure" not in text
