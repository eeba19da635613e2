"""The same pool through the cluster engine: a private Ray cluster on loopback that the test starts and stops, two CPU
actors with the tiny checkpoint (`serve --cluster --device cpu --workers 2`)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import threading
from functools import partial

import pytest

from backend.server.pool import PoolConfig
from backend.server.server import Server, ServerConfig
from pool_testkit import (HOLD, a_lost_worker_s_job_restarts_elsewhere, cancel_reaches_the_worker_running_the_job,
                          file_controlled_engine, many_clients_each_get_their_own_results, set_control,
                          wait_workers_idle)
from server_testkit import connect

# Not importorskip: importing ray here would fix its network settings before `--cluster local` picks loopback.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="needs Ray, the cluster extra (pip install -e '.[cluster]')")


@pytest.fixture(scope="module")
def control_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster-control_dir")


@pytest.fixture(scope="module")
def cluster_server(tiny_weights, control_dir, tmp_path_factory):
    config = ServerConfig(bind="tcp://127.0.0.1:*", weights=str(tiny_weights), device="cpu",
                          store=tmp_path_factory.mktemp("cluster-store"), max_queue=100, grace_s=0.0,
                          pool=PoolConfig(cluster="local", workers=2, hang_timeout_s=15.0, step_timeout_s=60.0))
    srv = Server(config, partial(file_controlled_engine, tiny_weights, control_dir))
    srv.start()
    thread = threading.Thread(target=srv.serve, name="cluster-server", daemon=True)
    thread.start()
    wait_workers_idle(srv.worker, 2, timeout=240)
    yield srv
    srv.stop(immediate=True)
    thread.join(60)
    assert not thread.is_alive()
    import ray

    assert not ray.is_initialized(), "the server leaves the cluster (and stops its private one) when it stops"


@pytest.fixture(autouse=True)
def _release(control_dir):
    yield
    set_control(control_dir, HOLD, False)


def test_info_lists_two_actors_on_a_loopback_cluster(cluster_server):
    import ray

    with connect(cluster_server.endpoint) as client:
        info = client.hello()
    assert [w.name for w in info.workers] == ["ray0", "ray1"]
    assert all(w.state.value == "idle" and w.device == "cpu" and w.host == socket.gethostname() for w in info.workers)
    assert len({w.pid for w in info.workers}) == 2 and os.getpid() not in {w.pid for w in info.workers}
    assert ray.util.get_node_ip_address() == "127.0.0.1"


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to list listening sockets")
def test_the_private_cluster_listens_on_loopback_only(cluster_server):
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout.splitlines()
    ray_ports = [line.split()[3] for line in listening if "raylet" in line or "gcs_server" in line]
    assert ray_ports and all("127.0.0.1" in address for address in ray_ports), ray_ports


def test_clients_jobs_spread_over_both_actors(cluster_server):
    pids = many_clients_each_get_their_own_results(cluster_server, clients=4, jobs=3, timeout=400)
    assert pids == {w.pid for w in cluster_server.worker.workers()}, "jobs must run on both actors"


def test_a_killed_actor_s_job_restarts_on_the_other(cluster_server, control_dir):
    lost, _ = a_lost_worker_s_job_restarts_elsewhere(cluster_server, control_dir,
                                                     lambda w: os.kill(w.pid, signal.SIGKILL))
    assert "cluster actor" in next(w for w in cluster_server.worker.workers() if w.name == lost.name).error


def test_cancel_reaches_the_actor_running_the_job(cluster_server, control_dir):
    cancel_reaches_the_worker_running_the_job(cluster_server, control_dir)
