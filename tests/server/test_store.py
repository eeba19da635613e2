"""The on-disk job store: outcomes survive reopening, writes are atomic, purging keeps what matters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.ovoxel.ovoxel import OVoxel
from backend.server.store import JobStore, MissingOVoxel, StoreError
from protocol import Cancelled, Error, ErrorCode, Result
from protocol.settings import GENERATE

GiB = 1 << 30


def make_result(job_id: str, n: int = 5) -> Result:
    rng = np.random.default_rng(n)
    return Result(job_id, mesh={"positions": rng.random((n, 3), dtype=np.float32),
                                "indices": np.arange(3 * n, dtype=np.uint32).reshape(n, 3)},
                  textures={"base_color": rng.integers(0, 255, (4, 4, 4), dtype=np.uint8)},
                  metadata={"seed": n, "timings": {"total": 1.5}})


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "store", max_bytes=GiB, max_age_s=3600)
    yield s
    s.close()


def test_outcomes_survive_reopening(tmp_path, store):
    for name in ("a", "b", "c", "d"):
        store.create(name, GENERATE, {"seed": 1}, image=b"image-" + name.encode(), client_job_id=f"client-{name}")
    result = make_result("a")
    assert store.finish("a", result)
    assert store.finish("b", Error(ErrorCode.JOB_FAILED, "no object", "try another seed", "b"))
    assert store.finish("c", Cancelled("c"))
    assert not store.finish("a", Cancelled("a")), "a job ends once"
    store.save_ovoxel("a", OVoxel(np.zeros((2, 3)), np.ones((2, 6)), 64, np.zeros((3, 3)), [[0, 1, 2]]))
    store.close()

    again = JobStore(tmp_path / "store", max_bytes=GiB, max_age_s=3600)
    loaded = again.terminal("a")
    assert isinstance(loaded, Result) and loaded.metadata == result.metadata
    for group in ("mesh", "textures"):
        for name, array in getattr(result, group).items():
            got = getattr(loaded, group)[name]
            assert got.dtype == array.dtype and np.array_equal(got, array)
    assert again.terminal("b") == Error(ErrorCode.JOB_FAILED, "no object", "try another seed", "b")
    assert again.terminal("c") == Cancelled("c")
    assert again.terminal("d") is None and [r.job_id for r in again.pending()] == ["d"]
    assert again.image("d") == b"image-d"
    assert again.get("d").client_job_id == "client-d" and again.get("d").settings == {"seed": 1}
    assert again.load_ovoxel("a").resolution == 64
    assert not (tmp_path / "store" / "jobs" / "a" / "input.image").exists(), "inputs go when the job ends"
    again.close()


def test_interrupted_writes_leave_no_trace(tmp_path, store):
    store.create("done", GENERATE, {}, image=b"img")
    store.finish("done", make_result("done"))
    store.create("queued", GENERATE, {}, image=b"img")
    store.close()
    jobs = tmp_path / "store" / "jobs"
    (jobs / "done" / "result.npz.tmp").write_bytes(b"half a file")  # a crash mid-write
    (jobs / "queued" / "record.json.tmp").write_bytes(b"{")
    (jobs / "crashed-submit").mkdir()  # its record was never written: the client never heard of it
    (jobs / "crashed-submit" / "input.image").write_bytes(b"img")

    again = JobStore(tmp_path / "store", max_bytes=GiB, max_age_s=3600)
    assert not list(jobs.rglob("*.tmp")) and not (jobs / "crashed-submit").exists()
    assert isinstance(again.terminal("done"), Result) and again.get("queued").state == "queued"
    again.close()


def test_a_damaged_result_becomes_an_error_not_a_crash(tmp_path, store):
    store.create("j", GENERATE, {}, image=b"img")
    store.finish("j", make_result("j"))
    (tmp_path / "store" / "jobs" / "j" / "result.npz").write_bytes(b"garbage")
    damaged = store.terminal("j")
    assert isinstance(damaged, Error) and damaged.code == ErrorCode.INTERNAL_ERROR and damaged.job_id == "j"


def test_purge_by_age_and_size_keeps_queued_and_uncollected_longest(tmp_path):
    store = JobStore(tmp_path / "s", max_bytes=GiB, max_age_s=100)
    for name in ("old", "collected", "uncollected", "waiting"):
        store.create(name, GENERATE, {}, image=b"x" * 1000)
    for name in ("old", "collected", "uncollected"):
        store.finish(name, make_result(name, 200))
    store.mark_delivered("collected")
    now = store.get("uncollected").finished
    store.get("old").finished = now - 1000  # ended long ago
    assert store.purge(now) == ["old"]

    store.max_bytes = store.get("uncollected").size + store.get("waiting").size  # room for one ended job
    assert store.purge(now) == ["collected"], "collected results go first"
    store.max_bytes = 1
    assert store.purge(now) == ["uncollected"]
    assert [r.job_id for r in store.pending()] == ["waiting"], "queued jobs are never purged"
    assert json.loads((tmp_path / "s" / "jobs" / "waiting" / "record.json").read_text())["state"] == "queued"
    store.close()


def test_one_server_per_store(tmp_path, store):
    with pytest.raises(StoreError, match="in use by another backend server"):
        JobStore(tmp_path / "store", max_bytes=GiB, max_age_s=3600)


def test_a_reprocessing_job_keeps_its_own_ovoxel(store):
    for name in ("source", "again", "nothing"):
        store.create(name, GENERATE, {}, image=b"img")
    store.save_ovoxel("source", OVoxel(np.zeros((2, 3)), np.ones((2, 6)), 32, np.zeros((3, 3)), [[0, 1, 2]]))
    store.share_ovoxel("source", "again")
    store.finish("source", Cancelled("source"))
    store.max_bytes = 0
    assert "source" in store.purge()
    assert store.has_ovoxel("again") and store.load_ovoxel("again").resolution == 32
    with pytest.raises(MissingOVoxel):
        store.share_ovoxel("source", "nothing")
