"""Two worker processes behind one server (`serve --workers 2`), tiny checkpoint, loopback: jobs spread over both,
each ends once in its own client; a killed, a frozen and a stuck worker lose no job and come back; cancel reaches the
worker that runs the job; a job whose worker fails twice ends with a clear error; overlap on one worker.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from functools import partial

import pytest

from backend.server.pool import PoolConfig
from backend.server.server import Server, ServerConfig
from backend.server.worker import EngineWorker, Finished, Generated, JobOrder, Ready, overlap_fits
from backend.server.requests import JobSpec
from pool_testkit import (HOLD, STALL, TINY_JOB, a_lost_worker_s_job_restarts_elsewhere,
                          cancel_reaches_the_worker_running_the_job, file_controlled_engine, holder,
                          many_clients_each_get_their_own_results, process_gone, set_control, wait_for_restart,
                          wait_workers_idle)
from protocol import Error, ErrorCode, Generate, ModelStatus, Progress, Result
from protocol.settings import GENERATE
from server_testkit import HELD_STAGE, connect, last, png, wait_for_stage, wait_until

HANG_TIMEOUT_S = 5.0
STEP_TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pool-control_dir")


@pytest.fixture(scope="module")
def pool_server(tiny_weights, control_dir, tmp_path_factory):
    config = ServerConfig(bind="tcp://127.0.0.1:*", weights=str(tiny_weights), device="cpu",
                          store=tmp_path_factory.mktemp("pool-store"), max_queue=100, grace_s=0.0,
                          pool=PoolConfig(workers=2, hang_timeout_s=HANG_TIMEOUT_S, step_timeout_s=STEP_TIMEOUT_S))
    srv = Server(config, partial(file_controlled_engine, tiny_weights, control_dir))
    srv.start()
    thread = threading.Thread(target=srv.serve, name="pool-server", daemon=True)
    thread.start()
    wait_workers_idle(srv.worker, 2)
    yield srv
    pids = [w.pid for w in srv.worker.workers()]
    srv.stop(immediate=True)
    thread.join(60)
    assert not thread.is_alive()
    assert all(process_gone(pid) for pid in pids), "worker processes must end with the server"


@pytest.fixture(autouse=True)
def _release(control_dir):
    yield
    for name in (HOLD, STALL):
        set_control(control_dir, name, False)


def test_info_lists_both_worker_processes(pool_server):
    with connect(pool_server.endpoint) as client:
        info = client.hello()
    assert info.model_status == ModelStatus.READY and info.device == "2 workers: cpu"
    assert [w.name for w in info.workers] == ["w0", "w1"]
    assert all(w.state.value == "idle" and w.device == "cpu" and w.host == socket.gethostname() for w in info.workers)
    pids = {w.pid for w in info.workers}
    assert len(pids) == 2 and os.getpid() not in pids, "each worker is a process of its own"
    assert all("sparse_structure_flow_model" in w.models for w in info.workers)


def test_eight_clients_ten_jobs_each_spread_over_both_workers(pool_server):
    pids = many_clients_each_get_their_own_results(pool_server, clients=8, jobs=10, timeout=500)
    assert pids == {w.pid for w in pool_server.worker.workers()}, "jobs must run on both workers"


def test_a_killed_worker_s_job_restarts_on_the_other(pool_server, control_dir):
    lost, timing = a_lost_worker_s_job_restarts_elsewhere(pool_server, control_dir,
                                                          lambda w: os.kill(w.pid, signal.SIGKILL))
    assert timing["detected_s"] < 5, "a worker's death is seen at once"
    assert "killed by SIGKILL" in next(w for w in pool_server.worker.workers() if w.name == lost.name).error


def test_a_frozen_worker_is_killed_and_its_job_restarts(pool_server, control_dir):
    lost, timing = a_lost_worker_s_job_restarts_elsewhere(pool_server, control_dir,
                                                          lambda w: os.kill(w.pid, signal.SIGSTOP))
    assert HANG_TIMEOUT_S <= timing["detected_s"] < HANG_TIMEOUT_S + 10
    assert process_gone(lost.pid), "the frozen process must be killed, so it can never finish the job"


def test_a_job_stuck_without_progress_restarts_on_the_other_worker(pool_server, control_dir):
    set_control(control_dir, STALL, True)
    with connect(pool_server.endpoint) as client:
        client.hello()
        job_id = client.submit(Generate(png(), {"seed": 3, **TINY_JOB}))
        restart = wait_for_restart(client, job_id, timeout=STEP_TIMEOUT_S + 60)
        set_control(control_dir, STALL, False)
        final = last(client.events(job_id, timeout=120))
    assert "made no progress" in restart.message and isinstance(final, Result)
    wait_workers_idle(pool_server.worker, 2)


def test_a_job_whose_worker_fails_twice_ends_with_a_clear_error(pool_server, control_dir):
    set_control(control_dir, HOLD, True)
    with connect(pool_server.endpoint) as client:
        client.hello()
        job_id = client.submit(Generate(png(), {"seed": 4, **TINY_JOB}))
        lost = []
        for _ in range(2):
            wait_for_stage(client, job_id, HELD_STAGE)
            lost.append(holder(pool_server.worker.workers(), job_id))
            os.kill(lost[-1].pid, signal.SIGKILL)
            if len(lost) == 1:
                wait_for_restart(client, job_id)
        final = last(client.events(job_id, timeout=60))
        assert lost[0].name != lost[1].name, "the re-queued job must go to the other worker"
        assert isinstance(final, Error) and final.code == ErrorCode.INTERNAL_ERROR and final.job_id == job_id
        assert "failed 2 times" in final.message and all(w.name in final.message for w in lost) and final.hint
        assert pool_server.store.get(job_id).state == "error"
        set_control(control_dir, HOLD, False)
        wait_workers_idle(pool_server.worker, 2)
        assert isinstance(client.generate(png(), TINY_JOB, timeout=120), Result), "the server goes on serving"


def test_cancel_reaches_the_worker_running_the_job(pool_server, control_dir):
    cancel_reaches_the_worker_running_the_job(pool_server, control_dir)


def test_overlap_starts_the_next_generation_during_an_asset_step(tiny_weights, tmp_path):
    """One worker with overlap: while job A is held in its asset step, it offers itself again and job B's
    generation runs to its O-Voxel; both then end with their results."""
    set_control(tmp_path, HOLD, True)
    events: list = []
    worker = EngineWorker("solo", partial(file_controlled_engine, tiny_weights, tmp_path), events.append, overlap=True)
    worker.start()
    try:
        def order(name: str, seed: int) -> JobOrder:
            return JobOrder(name, JobSpec(GENERATE, {"seed": seed, **TINY_JOB}), image=png(seed))

        wait_until(lambda: any(isinstance(e, Ready) for e in events), 120, "the worker to load")
        worker.run(order("a", 1))
        wait_until(lambda: any(isinstance(e, Progress) and (e.job_id, e.stage) == ("a", HELD_STAGE) for e in events),
                   120, "job a to reach its asset step")
        wait_until(lambda: sum(isinstance(e, Ready) for e in events) == 2, 30, "a second offer during a's asset step")
        worker.run(order("b", 2))
        wait_until(lambda: any(isinstance(e, Generated) and e.job_id == "b" for e in events), 120,
                   "job b's generation, beside a's asset step")
        assert not any(isinstance(e, Finished) for e in events), "a is still held"
        assert sum(isinstance(e, Ready) for e in events) == 2, "no third job while b waits for the asset lane"
        set_control(tmp_path, HOLD, False)
        wait_until(lambda: sum(isinstance(e, Finished) for e in events) == 2, 120, "both jobs to end")
    finally:
        worker.close(10)
    finished = {e.job_id: e.outcome for e in events if isinstance(e, Finished)}
    assert all(isinstance(outcome, Result) for outcome in finished.values()), finished
    assert [e.job_id for e in events if isinstance(e, Finished)] == ["a", "b"]


@pytest.mark.parametrize("available, peaks, fits", [
    (None, (0, 0), True),  # CPU: nothing to measure
    (10 << 30, (0, 2 << 30), False),  # a step not yet measured alone: no overlap
    (10 << 30, (4 << 30, 4 << 30), True),
    (9 << 30, (4 << 30, 4 << 30), False),  # within the margin
])
def test_overlap_needs_room_for_both_measured_peaks(available, peaks, fits):
    assert overlap_fits(available, *peaks) is fits


def test_serve_with_two_worker_processes_from_the_command_line(tiny_weights, tmp_path):
    """As an operator runs it: `serve --workers 2`; jobs from two clients use both workers, a killed worker comes
    back, and SIGTERM ends the server and its worker processes."""
    from test_server_restart import ServerProcess, free_address

    served = ServerProcess(tiny_weights, tmp_path / "store", tmp_path / "serve.log", free_address(), "--workers", "2",
                           "--grace", "0", "--hang-timeout", str(HANG_TIMEOUT_S))
    try:
        with connect(served.endpoint) as client:
            wait_until(lambda: client.info(refresh=True).model_status == ModelStatus.READY, 60, "the models")
            wait_until(lambda: [w.state.value for w in client.info(refresh=True).workers] == ["idle", "idle"], 120,
                       "both workers")
            workers = client.info(refresh=True).workers
            jobs = [client.submit(Generate(png(i), {"seed": i, **TINY_JOB})) for i in range(4)]
            results = [client.fetch(job_id, timeout=120) for job_id in jobs]
            assert all(isinstance(r, Result) for r in results)
            assert {r.metadata["worker"]["name"] for r in results} == {"w0", "w1"}
            os.kill(workers[0].pid, signal.SIGKILL)
            wait_until(lambda: client.info(refresh=True).workers[0].restarts == 1 and
                       client.info(refresh=True).workers[0].state.value == "idle", 120, "the killed worker to return")
            pids = [w.pid for w in client.info(refresh=True).workers]
        assert served.terminate() == 0
    finally:
        served.kill()
    assert all(process_gone(pid) for pid in pids), "worker processes end with the server"
    assert "worker w0 was killed by SIGKILL" in served.text()
