"""Workers on a Ray cluster (`serve --cluster ADDRESS`): one actor per GPU, placed by Ray's scheduler.

Why Ray: it is the distributed engine GPU farms already run (a head node, `ray start --address` on each box), its
scheduler places GPU actors and sets each one's CUDA_VISIBLE_DEVICES, it reports an actor's death to whoever calls it,
and large results travel through its object store; we add no discovery, membership or scheduling of our own. The
server stays the one ZeroMQ front door: jobs queue in its pool (pool.py), which hands each to a free actor and
supervises actors exactly like local worker processes (heartbeats, re-queue once, restart).

An actor is an `EngineWorker` (worker.py) behind four calls: run, cancel, interrupt and poll. `poll` waits up to a
second for the worker's events and returns them, so the supervisor hears at least a heartbeat a second from a live
actor; a result is the return value of a poll, carried by the object store. `ray` is an optional extra
(`pip install -e '.[cluster]'`), imported only here and only when `--cluster` is given.

`--cluster local` starts a private one-machine Ray bound to loopback only (what the tests use); any other address
joins that cluster, which the operator started with `ray start` (backend/server/README.md, "Deployment").
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from backend.server.worker import EngineWorker, Event, EventQueue, JobOrder, Loader, WorkerLost

log = logging.getLogger(__name__)

LOCAL = "local"
POLL_WAIT_S = 1.0  # how long one poll waits inside the actor for the first event
ACTOR_CONCURRENCY = 4  # a poll may wait while run, cancel and interrupt come in
NAMESPACE = "trellis2"
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch for a single-node cluster on loopback


class ClusterWorker:
    """The actor: one engine on the GPU Ray gave it (or on a CPU for `--device cpu`)."""

    def __init__(self, name: str, load: Loader, overlap: bool) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._events = EventQueue()
        self._worker = EngineWorker(name, load, self._events.put, overlap)
        self._worker.start()

    def run(self, order: JobOrder) -> None:
        self._worker.run(order)

    def cancel(self, job_id: str) -> None:
        self._worker.cancel(job_id)

    def interrupt(self) -> None:
        self._worker.interrupt()

    def stop(self) -> None:
        self._worker.close(5.0)

    def poll(self, wait_s: float) -> list[Event]:
        return self._events.drain(wait_s)


class RayTransport:
    """The server's end of one cluster actor."""

    killable = True
    start_timeout_s = None  # the cluster may take its time placing the actor (a busy farm, a node joining)

    def __init__(self, name: str, load: Loader, overlap: bool, gpu: bool) -> None:
        import ray

        self._ray = ray
        resources = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        actor_class = ray.remote(ClusterWorker).options(max_concurrency=ACTOR_CONCURRENCY, **resources)
        self._actor = actor_class.remote(name, load, overlap)
        self._poll: Any = None

    def run(self, order: JobOrder) -> None:
        self._actor.run.remote(order)

    def cancel(self, job_id: str) -> None:
        self._actor.cancel.remote(job_id)

    def interrupt(self) -> None:
        self._actor.interrupt.remote()

    def receive(self, timeout: float) -> list[Event]:
        if self._poll is None:
            self._poll = self._actor.poll.remote(POLL_WAIT_S)
        ready, _ = self._ray.wait([self._poll], timeout=timeout)
        if not ready:
            return []
        reply, self._poll = self._poll, None
        try:
            return self._ray.get(reply)
        except self._ray.exceptions.RayError as exc:
            raise WorkerLost(f"lost its cluster actor ({str(exc).strip().splitlines()[0][:300]})") from None

    def kill(self) -> None:
        self._ray.kill(self._actor, no_restart=True)

    def close(self, timeout: float) -> None:
        try:
            self._ray.get(self._actor.stop.remote(), timeout=timeout)
        except self._ray.exceptions.RayError:
            pass
        self.kill()


def connect(address: str, workers: int | None) -> None:
    """Join the Ray cluster at `address`, or start a loopback-only one for `local`. Raises ValueError saying how
    to fix a missing extra or an unreachable cluster."""
    if address == LOCAL:
        os.environ[LOOPBACK_ONLY] = "0"  # read when ray is first imported: from here on, Ray binds to loopback
    try:
        import ray
    except ImportError:
        raise ValueError("--cluster needs Ray, the optional cluster extra: pip install -e '.[cluster]' (or "
                         "pip install 'ray[default]')") from None
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": logging.WARNING}
    if address == LOCAL:  # this machine's actors import what this process can (a loader from a script, tests)
        kwargs.update(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, workers or 0),
                      runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot join the Ray cluster at {address}: {exc} (is `ray start --head` running there, "
                         f"and does this machine have the cluster's auth token?)") from None
    if address == LOCAL and not ray.util.get_node_ip_address().startswith("127."):
        ray.shutdown()
        raise ValueError("the local Ray cluster did not bind to loopback (ray was imported before --cluster local "
                         "could configure it)")
    log.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())


def gpu_count() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def disconnect() -> None:
    """Leave the cluster (its actors end with this driver); a local cluster stops."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
