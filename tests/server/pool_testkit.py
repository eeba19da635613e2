"""Helpers for the worker-pool tests: an engine controlled through files (worker processes and cluster actors share
no memory with the test), tiny job settings, and a look at which worker holds a job.

Files in the control folder: `hold` keeps every job at the start of its asset step, reporting progress (so it can
be cancelled or killed there); `stall` keeps it there without progress, like a hung kernel.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from backend.asset.postprocess import build_textured_mesh
from backend.engine import Engine, load_engine
from protocol import Client, Progress, WorkerStatus
from server_testkit import FAST_ASSET, HELD_STAGE, events_until_ended, wait_until

TINY_JOB = {"pipeline_type": "512", "sparse_structure_steps": 2, "shape_steps": 2, "texture_steps": 2, **FAST_ASSET}
HOLD, STALL = "hold", "stall"


def file_controlled_engine(weights: Path, controls: Path) -> Engine:
    """The real engine (one intra-op thread: see conftest.py), whose asset step obeys the control files."""
    import torch

    torch.set_num_threads(1)

    def build_asset(ovoxel, settings, progress):
        while (controls / HOLD).exists():
            progress(HELD_STAGE, 0, 0)
            time.sleep(0.02)
        while (controls / STALL).exists():
            time.sleep(0.05)
        return build_textured_mesh(ovoxel, settings, progress, device="cpu")

    return load_engine(str(weights), "cpu", build_asset=build_asset)


def set_control(controls: Path, name: str, on: bool) -> None:
    path = controls / name
    if on:
        path.touch()
    else:
        path.unlink(missing_ok=True)


def holder(workers: list[WorkerStatus], job_id: str) -> WorkerStatus:
    """The worker running `job_id`."""
    found = [w for w in workers if job_id in w.jobs]
    assert len(found) == 1, f"job {job_id} should run on exactly one worker: {workers}"
    return found[0]


def wait_for_restart(client: Client, job_id: str, timeout: float = 60) -> Progress:
    """Consume the job's events until its worker is reported lost; returns that progress message."""
    for msg in client.events(job_id, timeout):
        assert not msg.TERMINAL, f"job ended before it was restarted: {msg}"
        if isinstance(msg, Progress) and msg.message.startswith("restarting"):
            return msg
    raise AssertionError(f"no restart of job {job_id}")


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_workers_idle(pool, count: int, timeout: float = 120) -> list[WorkerStatus]:
    """Wait until `count` workers are loaded and idle; returns them."""
    wait_until(lambda: sum(w.state.value == "idle" for w in pool.workers()) == count, timeout,
               f"{count} idle workers")
    return pool.workers()


# -- scenarios run against both a process pool and a cluster pool ------------------------------------------------

def many_clients_each_get_their_own_results(server, clients: int, jobs: int, timeout: float) -> set[int]:
    """`clients` threads submit `jobs` tiny jobs each at once; every job ends exactly once, with a result, in the
    client that submitted it, and equal seeds give equal meshes on any worker. Returns the worker pids that ran."""
    import threading

    import numpy as np

    from protocol import Generate, Result
    from server_testkit import connect, png

    outcomes: dict[int, tuple[dict, list, dict]] = {}
    failures: list[BaseException] = []

    def run_client(k: int) -> None:
        try:
            with connect(server.endpoint) as client:
                client.hello()
                mine = {client.submit(Generate(png(k), {"seed": (k + i) % 3, **TINY_JOB}, f"c{k}-{i}")): (k + i) % 3
                        for i in range(jobs)}
                seen, ended = events_until_ended(client, mine, timeout)
                outcomes[k] = (mine, seen, ended)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run_client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    assert not failures, failures
    assert len(outcomes) == clients
    pids: set[int] = set()
    meshes: dict[tuple[int, int], np.ndarray] = {}
    for k, (mine, seen, ended) in outcomes.items():
        assert {msg.job_id for msg in seen} == set(mine), "a client got another client's events"
        assert set(ended) == set(mine), f"client {k}: {len(mine) - len(ended)} job(s) never ended"
        for job_id, seed in mine.items():
            assert sum(m.TERMINAL for m in seen if m.job_id == job_id) == 1
            result = ended[job_id]
            assert isinstance(result, Result), result
            assert result.metadata["settings"]["seed"] == seed
            pids.add(result.metadata["worker"]["pid"])
            key = (k, seed)  # the same image (png(k)) and seed must give the same mesh, whichever worker ran it
            if key in meshes:
                assert np.array_equal(meshes[key], result.mesh["positions"]), f"client {k} seed {seed} differs"
            meshes[key] = result.mesh["positions"]
    return pids


def a_lost_worker_s_job_restarts_elsewhere(server, controls: Path, lose) -> tuple[WorkerStatus, dict]:
    """Hold a job mid-run, lose its worker with `lose(worker)`; the client sees the job restart, then its result
    from another worker; the lost worker comes back under a new pid. Returns the lost worker and the restart
    timing."""
    from protocol import Generate, Result
    from server_testkit import connect, last, png, wait_for_stage

    set_control(controls, HOLD, True)
    with connect(server.endpoint) as client:
        client.hello()
        job_id = client.submit(Generate(png(), {"seed": 5, **TINY_JOB}))
        wait_for_stage(client, job_id, HELD_STAGE)
        lost = holder(server.worker.workers(), job_id)
        started = time.monotonic()
        lose(lost)
        restart = wait_for_restart(client, job_id)
        detected_s = time.monotonic() - started
        assert lost.name in restart.message and restart.fraction == 0.0
        set_control(controls, HOLD, False)
        final = last(client.events(job_id, timeout=120))
    assert isinstance(final, Result), final
    assert final.metadata["worker"]["pid"] != lost.pid, "the job must not be finished by the worker that was lost"
    assert final.metadata["worker"]["name"] != lost.name, "the re-queued job goes to the other worker"
    wait_until(lambda: next(w for w in server.worker.workers() if w.name == lost.name).state.value == "idle", 120,
               f"worker {lost.name} to come back")
    back = next(w for w in server.worker.workers() if w.name == lost.name)
    assert back.restarts == lost.restarts + 1 and back.pid != lost.pid and back.error
    return lost, {"detected_s": detected_s}


def cancel_reaches_the_worker_running_the_job(server, controls: Path) -> None:
    """Two held jobs on the two workers: cancelling one stops that one only; the other ends with its result."""
    from protocol import Cancelled, Generate, Result
    from server_testkit import connect, last, png, wait_for_stage

    set_control(controls, HOLD, True)
    with connect(server.endpoint) as client:
        client.hello()
        first = client.submit(Generate(png(), {"seed": 1, **TINY_JOB}))
        second = client.submit(Generate(png(), {"seed": 2, **TINY_JOB}))
        wait_for_stage(client, first, HELD_STAGE)
        wait_for_stage(client, second, HELD_STAGE)
        workers = server.worker.workers()
        assert holder(workers, first).name != holder(workers, second).name, "the two jobs share a worker"
        client.cancel(first)
        assert last(client.events(first, timeout=30)) == Cancelled(first)
        assert server.worker.running() == [second], "the other job must still run"
        set_control(controls, HOLD, False)
        assert isinstance(last(client.events(second, timeout=120)), Result)
