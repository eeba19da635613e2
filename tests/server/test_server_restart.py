"""The server as an operator runs it, in its own process: SIGTERM with a job mid-run, restart on the same store.

Run 1 (--grace 0): a finished job, then a job interrupted by SIGTERM, which must stay queued on disk.
Run 2 (--grace 60): the finished result is still there, the interrupted job runs again to its result, and a job
running at SIGTERM is finished (and delivered) before the process exits.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from protocol import Generate, ModelStatus, Progress, Result
from server_testkit import FAST_ASSET, connect, png, wait_for_stage, wait_until

REPO = Path(__file__).resolve().parents[2]
LAUNCH = "import sys; from backend.server.server import main; sys.exit(main())"
SLOW = {"seed": 1, "sparse_structure_steps": 100, **FAST_ASSET}


class ServerProcess:
    def __init__(self, weights: Path, store: Path, log: Path, *extra: str) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see the note in conftest.py
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, "--bind", "tcp://127.0.0.1:*", "--weights", str(weights),
                 "--device", "cpu", "--store", str(store), *extra],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: "listening on" in self.text() or self.proc.poll() is not None, 60, "the server to start")
        self.endpoint = re.search(r"listening on (\S+)", self.text()).group(1)

    def text(self) -> str:
        return self.log.read_text()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_ready(client) -> None:
    wait_until(lambda: client.info(refresh=True).model_status == ModelStatus.READY, 60, "the models")


def test_sigterm_and_restart_lose_nothing(tiny_weights, tmp_path):
    store = tmp_path / "store"
    first = ServerProcess(tiny_weights, store, tmp_path / "run1.log", "--grace", "0")
    try:
        with connect(first.endpoint) as client:
            wait_ready(client)
            done = client.generate(png(), {"seed": 1, **FAST_ASSET}, timeout=60)
            interrupted = client.submit(Generate(png(), SLOW))
            wait_for_stage(client, interrupted, "sparse_structure")
            assert first.terminate() == 0
    finally:
        first.kill()
    assert f"job {interrupted} interrupted by shutdown" in first.text() and "server stopped" in first.text()

    second = ServerProcess(tiny_weights, store, tmp_path / "run2.log", "--grace", "60")
    try:
        with connect(second.endpoint) as client:
            kept = client.fetch(done.job_id, timeout=30)
            assert isinstance(kept, Result) and kept.metadata == done.metadata
            assert all(np.array_equal(kept.mesh[k], done.mesh[k]) for k in done.mesh)
            resumed = client.fetch(interrupted, timeout=90)
            assert isinstance(resumed, Result) and resumed.metadata["settings"]["seed"] == 1

            finishing = client.submit(Generate(png(), SLOW))
            wait_for_stage(client, finishing, "sparse_structure")
            second.proc.send_signal(signal.SIGTERM)
            events = list(client.events(finishing, timeout=90))
            assert isinstance(events[-1], Result), "the running job finishes within the grace period"
            assert {m.stage for m in events if isinstance(m, Progress)} >= {"texture", "bake"}
            assert second.proc.wait(30) == 0
    finally:
        second.kill()
    assert f"job {interrupted} re-queued from the store" in second.text()
