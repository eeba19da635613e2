"""Jobs per hour through the real server and its worker pool, with random full-size weights (no checkpoint needed).

Each `--setup` is a set of `serve` worker flags (`"--gpus 0"`, `"--gpus 0 --overlap"`, `"--gpus all"`,
`"--workers 2 --device cuda"`). For each, an in-process server (loopback) starts its workers, which build the
full-size `1024_cascade` pipeline with calibrated random weights (backend/bench/full_size.py) and the real asset
step (500k faces, 2048² textures); a warm-up job per worker (not timed; it also measures the memory peaks that
`--overlap` needs), then `--clients` client threads submit `--jobs` jobs each at once. `--kill-one` kills (SIGKILL)
the worker process of a running job once a quarter of the jobs have ended: that job must restart on another worker
and the killed worker must come back. Checked for every run: each job ends exactly once, with a result, in the
client that submitted it; the table says how the jobs split over the workers.

On the GPU machine:
    python benchmarks/pool_throughput.py --setup "--gpus 0" --setup "--gpus 0 --overlap"       # one H200
    python benchmarks/pool_throughput.py --setup "--gpus all" --kill-one --setup "--gpus 0"     # two GPUs
On a CPU (checks the runner itself, tiny checkpoint, tiny jobs):
    python benchmarks/pool_throughput.py --tiny --setup "--workers 2 --device cpu" --kill-one --clients 4 --jobs 3
`--out FILE.json` accumulates rows over runs (one command per setup stays within a device call's limit); the table
printed at the end covers every row in the file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # spawned workers inherit this path

from backend.server.pool import PoolConfig  # noqa: E402
from backend.server.server import Server, ServerConfig, _load_engine, register  # noqa: E402
from protocol import Client, Generate, Result, WorkerState  # noqa: E402

FULL_JOB = {"pipeline_type": "1024_cascade", "seed": 1, "faces": 500_000, "texture_size": 2048}
TINY_JOB = {"pipeline_type": "512", "seed": 1, "sparse_structure_steps": 2, "shape_steps": 2, "texture_steps": 2,
            "faces": 1000, "texture_size": 256}


def random_engine():
    """A worker's engine: the full-size pipeline with calibrated random weights on its GPU, the real asset step."""
    import torch

    from backend.asset.postprocess import build_textured_mesh
    from backend.bench.full_size import MODELS, calibrate, random_conditioner, random_model, random_pipeline
    from backend.engine import Engine

    device = torch.device("cuda")
    torch.manual_seed(0)  # every worker builds the same random pipeline
    models = {name: random_model(name, device) for name in MODELS}
    calibrate(models, device)
    pipeline = random_pipeline(models, random_conditioner(device), device, offload=False)
    return Engine(pipeline, partial(build_textured_mesh, device=device), device)


def job_image(tiny: bool) -> bytes:
    from backend.bench.run import disc_image

    buf = io.BytesIO()
    (disc_image().resize((64, 64)) if tiny else disc_image()).save(buf, "PNG")
    return buf.getvalue()


def pool_config(setup: str) -> tuple[PoolConfig, str | None]:
    """The PoolConfig and --device that `serve` would make of these flags (its own parser)."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", *shlex.split(setup)])
    return PoolConfig(args.gpus, args.workers, args.cluster, args.overlap, args.hang_timeout,
                      args.step_timeout), args.device


class Watcher(threading.Thread):
    """Polls the pool: which pid belongs to which worker (restarts included), and a kill once a quarter of the
    jobs have ended."""

    def __init__(self, server: Server, kill_after: int | None, ended: list[int]) -> None:
        super().__init__(daemon=True)
        self.server, self.kill_after, self.ended = server, kill_after, ended
        self.names: dict[int, str] = {}
        self.killed: dict[str, Any] | None = None
        self.back_after_s: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            workers = self.server.worker.workers()
            self.names.update({w.pid: w.name for w in workers if w.pid is not None})
            if self.kill_after is not None and self.killed is None and self.ended[0] >= self.kill_after:
                busy = [w for w in workers if w.jobs and w.pid is not None]
                if busy:
                    victim = busy[0]
                    os.kill(victim.pid, signal.SIGKILL)
                    self.killed = {"worker": victim.name, "pid": victim.pid, "job": victim.jobs[0],
                                   "at": time.monotonic()}
            if self.killed is not None and self.back_after_s is None:
                again = next(w for w in workers if w.name == self.killed["worker"])
                if again.pid != self.killed["pid"] and again.state in (WorkerState.IDLE, WorkerState.BUSY):
                    self.back_after_s = time.monotonic() - self.killed["at"]


def run_clients(endpoint: str, clients: int, jobs: int, settings: dict, image: bytes, ended: list[int],
                timeout: float) -> list[dict[str, Any]]:
    """`clients` threads submit `jobs` jobs each at once; returns one record per job (its client's view)."""
    records: list[dict[str, Any]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client_thread(k: int) -> None:
        try:
            with Client(endpoint, timeout=60.0, dead_after=60.0) as client:
                client.hello()
                mine = {}
                for i in range(jobs):
                    mine[client.submit(Generate(image, settings, f"c{k}-{i}"))] = time.monotonic()
                terminals: dict[str, list] = {job_id: [] for job_id in mine}
                foreign, restarted = [], set()
                deadline = time.monotonic() + timeout
                while sum(map(len, terminals.values())) < len(mine) and time.monotonic() < deadline:
                    msg = client.poll_event(500)
                    if msg is None:
                        continue
                    if msg.job_id not in mine:
                        foreign.append(msg.job_id)
                    elif msg.TERMINAL:
                        terminals[msg.job_id].append((msg, time.monotonic()))
                        with lock:
                            ended[0] += 1
                    elif getattr(msg, "message", "").startswith("restarting"):
                        restarted.add(msg.job_id)
                for job_id, submitted in mine.items():
                    ends = terminals[job_id]
                    final = ends[0][0] if ends else None
                    with lock:
                        records.append({
                            "client": k, "job": job_id, "terminals": len(ends), "foreign_events": len(foreign),
                            "result": isinstance(final, Result), "outcome": final.TYPE if final else "none",
                            "error": getattr(final, "message", None), "restarted": job_id in restarted,
                            "latency_s": ends[0][1] - submitted if ends else None,
                            "worker_pid": final.metadata["worker"]["pid"] if isinstance(final, Result) else None,
                            "worker": final.metadata["worker"]["name"] if isinstance(final, Result) else None})
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 60)
    if failures:
        raise RuntimeError(f"client failures: {failures}")
    return records


def run_setup(setup: str, args: argparse.Namespace, weights: str | None) -> dict[str, Any]:
    config, device = pool_config(setup)
    load = partial(_load_engine, weights, device, "auto", None) if weights else random_engine
    total = args.clients * args.jobs
    with tempfile.TemporaryDirectory() as store:
        server = Server(ServerConfig(bind="tcp://127.0.0.1:*", weights=weights, device=device, store=Path(store),
                                     max_queue=total + 16, grace_s=0.0, pool=config), load)
        started = time.monotonic()
        server.start()
        loop = threading.Thread(target=server.serve, daemon=True)
        loop.start()
        try:
            count = len(server.worker.workers())
            while sum(w.state == WorkerState.IDLE for w in server.worker.workers()) < count:
                if all(w.state == WorkerState.FAILED for w in server.worker.workers()):
                    raise RuntimeError(f"every worker failed to load: {server.worker.load_error}")
                time.sleep(0.5)
            load_s = time.monotonic() - started
            settings, image = (TINY_JOB if args.tiny else FULL_JOB), job_image(args.tiny)
            warm = run_clients(server.endpoint, count, 1, settings, image, [0], args.timeout)
            assert all(r["result"] for r in warm), f"warm-up failed: {warm}"
            ended = [0]
            watcher = Watcher(server, total // 4 if args.kill_one else None, ended)
            watcher.start()
            begin = time.monotonic()
            records = run_clients(server.endpoint, args.clients, args.jobs, settings, image, ended, args.timeout)
            wall_s = time.monotonic() - begin
            time.sleep(1.0 if watcher.killed is None or watcher.back_after_s is not None else 0.0)
            if watcher.killed is not None:
                deadline = time.monotonic() + args.timeout
                while watcher.back_after_s is None and time.monotonic() < deadline:
                    time.sleep(0.5)
            watcher.done.set()
            workers = server.worker.workers()
        finally:
            server.stop(immediate=True)
            loop.join(120)
    problems = [r for r in records if r["terminals"] != 1 or not r["result"] or r["foreign_events"]]
    latencies = sorted(r["latency_s"] for r in records if r["latency_s"] is not None)
    by_worker: dict[str, int] = {}
    for r in records:
        if r["worker"]:
            by_worker[r["worker"]] = by_worker.get(r["worker"], 0) + 1
    row: dict[str, Any] = {
        "setup": setup, "workers": [w.name for w in workers], "devices": sorted({w.device for w in workers}),
        "jobs": total, "clients": args.clients, "wall_s": wall_s, "jobs_per_hour": total / wall_s * 3600,
        "latency_p50_s": statistics.median(latencies), "latency_max_s": latencies[-1],
        "latency_p90_s": latencies[int(0.9 * (len(latencies) - 1))], "load_s": load_s, "by_worker": by_worker,
        "all_ended_once_in_their_client": not problems, "problems": problems[:5], "tiny": args.tiny}
    if watcher.killed is not None:
        victim = next(r for r in records if r["job"] == watcher.killed["job"])
        row["kill"] = {**{k: v for k, v in watcher.killed.items() if k != "at"},
                       "job_restarted": victim["restarted"], "job_finished_on": victim["worker"],
                       "worker_back_after_s": watcher.back_after_s,
                       "restarts": {w.name: w.restarts for w in workers}}
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setup | workers | jobs | wall s | jobs/h | latency p50 / p90 / max s | jobs per worker | all ended "
             "once | kill |", "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for r in rows:
        kill = r.get("kill")
        kill_text = (f"{kill['worker']} killed in job {kill['job'][:8]}: restarted={kill['job_restarted']}, "
                     f"finished on {kill['job_finished_on']}, back after {kill['worker_back_after_s']:.0f} s"
                     if kill and kill["worker_back_after_s"] is not None else ("worker never came back" if kill
                                                                              else ""))
        lines.append(f"| `{r['setup']}`{' (tiny)' if r['tiny'] else ''} | {len(r['workers'])} | {r['jobs']} | "
                     f"{r['wall_s']:.0f} | {r['jobs_per_hour']:.0f} | {r['latency_p50_s']:.1f} / "
                     f"{r['latency_p90_s']:.1f} / {r['latency_max_s']:.1f} | "
                     f"{', '.join(f'{k}: {v}' for k, v in sorted(r['by_worker'].items()))} | "
                     f"{'yes' if r['all_ended_once_in_their_client'] else 'NO'} | {kill_text} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="append", required=True, help="serve's worker flags, quoted")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=4, help="jobs per client")
    parser.add_argument("--kill-one", action="store_true", help="kill a busy worker once a quarter of jobs ended")
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint and tiny jobs (checks, on CPU)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a client waits for its jobs")
    parser.add_argument("--out", type=Path, default=Path("pool_throughput.json"))
    args = parser.parse_args()
    weights = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from backend.trellis2.tiny import write_tiny_checkpoint

            weights = str(write_tiny_checkpoint(Path(tmp) / "tiny"))
        rows = [run_setup(setup, args, weights) for setup in args.setup]
    previous = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    report = {"commit": os.popen(f"git -C {REPO} rev-parse --short HEAD 2>/dev/null").read().strip(),
              "device": _device_name(), "rows": previous + rows}
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(rows, indent=1))
    print(table(report["rows"]))
    return 0 if all(r["all_ended_once_in_their_client"] and (r.get("kill") or {}).get("job_restarted", True)
                    for r in rows) else 1


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
