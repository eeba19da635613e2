"""Job life on the shared loopback server: results, concurrency, cancel, re-attach, faults, settings, limits."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import backend
from backend.errors import JobFailure
from backend.trellis2.pipeline import PIPELINE_TYPES
from protocol import (PROTOCOL_VERSION, Accepted, Cancelled, Error, ErrorCode, Fetch, Generate, Limits,
                      MalformedMessage, ModelStatus, Ping, Pong, Progress, RemoteError, Reprocess, Result, Schema)
from server_testkit import (FAST_ASSET, HELD_STAGE, connect, corrupt_png, events_until_ended, last, png, RawPeer,
                         wait_for_stage, wait_until)

SETTINGS = {"seed": 1, **FAST_ASSET}


def test_info_reports_versions_device_model_and_queue(server):
    with connect(server.endpoint) as client:
        info = client.hello()
    assert (info.model_status, info.device, info.queue_length) == (ModelStatus.READY, "cpu", 0)
    assert info.server_version == backend.__version__ and info.model == server.config.weights
    assert info.details["protocol"] == PROTOCOL_VERSION and info.details["torch"] == str(torch.__version__)
    assert info.details["model_error"] is None and info.gpu_memory_free is None  # on CPU
    assert info.limits == server.config.limits and {"cancel", "fetch", "reprocess"} <= set(info.capabilities)


def test_job_life_accepted_progress_result(server):
    with connect(server.endpoint) as client:
        client.hello()
        job_id = client.submit(Generate(png(), SETTINGS, "mine-1"))
        accepted, *progress, result = list(client.events(job_id, timeout=60))
    assert accepted == Accepted(job_id, 0, "mine-1")
    assert progress and all(isinstance(m, Progress) and m.job_id == job_id for m in progress)
    fractions = [m.fraction for m in progress]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] <= 1.0
    assert {"preprocess", "sparse_structure", "texture", "decode", "bake"} <= {m.stage for m in progress}

    assert isinstance(result, Result) and result.job_id == job_id
    mesh, tex, meta = result.mesh, result.textures, result.metadata
    n = len(mesh["positions"])
    assert n > 0 and mesh["positions"].dtype == np.float32 and mesh["positions"].shape == (n, 3)
    assert mesh["indices"].dtype == np.uint32 and mesh["indices"].shape[1] == 3 and mesh["indices"].max() < n
    assert mesh["normals"].shape == (n, 3) and mesh["uvs"].shape == (n, 2)
    assert tex["base_color"].shape == (256, 256, 4) and tex["metallic_roughness"].shape == (256, 256, 3)
    assert meta["alpha_mode"] in ("OPAQUE", "MASK", "BLEND") and isinstance(meta["double_sided"], bool)
    assert meta["settings"]["seed"] == 1 and meta["face_count"] == len(mesh["indices"])
    assert meta["timings"]["total"] >= meta["timings"]["sparse_structure"] > 0


def test_many_clients_at_once_get_their_own_results(server):
    seeds = [[1, 2], [3, 1], [2, 3], [4, 4]]  # one list per client; equal seeds must give equal meshes
    outcomes: dict[int, tuple] = {}
    failures: list[BaseException] = []

    def run_client(k: int) -> None:
        try:
            with connect(server.endpoint) as client:
                client.hello()
                mine = {client.submit(Generate(png(), {"seed": s, **FAST_ASSET}, f"c{k}-{i}")): s
                        for i, s in enumerate(seeds[k])}
                seen, ended = events_until_ended(client, mine, 120)
                outcomes[k] = (mine, seen, ended)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run_client, args=(k,)) for k in range(len(seeds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert not failures, failures
    by_seed: dict[int, list[np.ndarray]] = {}
    for mine, seen, ended in outcomes.values():
        assert {msg.job_id for msg in seen} == set(mine), "a client got another client's events"
        assert set(ended) == set(mine), "a result was lost"
        for job_id, seed in mine.items():
            assert [m.TYPE for m in seen if m.job_id == job_id][0] == "accepted"
            assert sum(m.TERMINAL for m in seen if m.job_id == job_id) == 1
            result = ended[job_id]
            assert isinstance(result, Result) and result.metadata["settings"]["seed"] == seed
            by_seed.setdefault(seed, []).append(result.mesh["positions"])
    for seed, meshes in by_seed.items():
        assert all(np.array_equal(m, meshes[0]) for m in meshes), f"seed {seed} gave different meshes"
    assert not np.array_equal(by_seed[1][0], by_seed[2][0]), "different seeds should give different meshes"


def test_cancel_queued_at_once_and_running_at_next_step(server, controls):
    controls.gate.clear()
    with connect(server.endpoint) as client:
        client.hello()
        running = client.submit(Generate(png(), SETTINGS))
        wait_for_stage(client, running, HELD_STAGE)
        queued = client.submit(Generate(png(), SETTINGS))
        client.cancel(queued)
        queued_events = list(client.events(queued, timeout=10))  # while the running job is still held
        assert queued_events[0] == Accepted(queued, 1, queued_events[0].client_job_id)
        assert queued_events[-1] == Cancelled(queued) and server.store.get(queued).state == "cancelled"
        assert {m.stage for m in queued_events if isinstance(m, Progress)} <= {"queued"}, "it must never run"
        assert server.worker.running() == [running]

        client.cancel(running)
        assert last(client.events(running, timeout=10)) == Cancelled(running)
        controls.gate.set()
        assert isinstance(client.generate(png(), SETTINGS, timeout=60), Result), "the server goes on serving"


def test_pings_are_answered_mid_step_and_cancel_stops_generation_between_steps(server):
    slow = {"seed": 1, "sparse_structure_steps": 100, **FAST_ASSET}
    with connect(server.endpoint) as client:
        client.hello()
        job_id = client.submit(Generate(png(), slow))
        wait_for_stage(client, job_id, "sparse_structure")
        pinger = RawPeer(server.endpoint)
        try:
            for seq in range(5):
                pinger.send(Ping(seq))
                assert pinger.recv(timeout=5) == Pong(seq, server.instance, False)
        finally:
            pinger.close()
        assert server.worker.running() == [job_id], "the pongs came while the job was running"
        client.cancel(job_id)
        events = list(client.events(job_id, timeout=30))
    assert events[-1] == Cancelled(job_id)
    assert {m.stage for m in events[:-1]} <= {"sparse_structure"}, "it went on past the step it was cancelled at"
    assert all(m.step < 1000 for m in events[:-1])


def test_a_client_that_went_away_fetches_its_result_later(server, controls):
    controls.gate.clear()
    first = connect(server.endpoint)
    first.hello()
    job_id = first.submit(Generate(png(), SETTINGS))
    wait_for_stage(first, job_id, HELD_STAGE)
    first.close()  # gone mid-job

    again = RawPeer(server.endpoint)  # a new connection re-attaches the running job with `fetch`
    try:
        again.send(Fetch(job_id))
        latest = again.recv()
        assert isinstance(latest, Progress) and latest.job_id == job_id and latest.stage == HELD_STAGE
        controls.gate.set()
        while not (msg := again.recv(60)).TERMINAL:
            assert msg.job_id == job_id
        assert isinstance(msg, Result)
    finally:
        again.close()
    with connect(server.endpoint) as third:  # and once more, from the store, identical
        third.hello()
        stored = third.fetch(job_id, timeout=30)
    assert isinstance(stored, Result) and stored.metadata == msg.metadata
    assert all(np.array_equal(stored.mesh[k], msg.mesh[k]) for k in msg.mesh)
    assert server.store.get(job_id).delivered


def test_fetch_and_cancel_of_unknown_jobs(server):
    with connect(server.endpoint) as client:
        client.hello()
        fetched = client.fetch("no-such-job", timeout=10)
        client.cancel("nor-this-one")
        cancelled = last(client.events("nor-this-one", timeout=10))
    for msg, job_id in ((fetched, "no-such-job"), (cancelled, "nor-this-one")):
        assert isinstance(msg, Error) and msg.code == ErrorCode.UNKNOWN_JOB and msg.job_id == job_id


def test_failures_end_only_their_own_job(server, controls):
    faults = [(RuntimeError("boom"), ErrorCode.INTERNAL_ERROR, "boom"),
              (torch.cuda.OutOfMemoryError("CUDA out of memory"), ErrorCode.OUT_OF_MEMORY, "out of memory"),
              (JobFailure("no object found", "try another seed"), ErrorCode.JOB_FAILED, "no object found")]
    with connect(server.endpoint) as client:
        client.hello()
        for fault, code, words in faults:
            controls.fault = fault
            job_id = client.submit(Generate(png(), SETTINGS))
            final = last(client.events(job_id, timeout=60))
            assert isinstance(final, Error) and (final.code, final.job_id) == (code, job_id) and words in final.message
        job_id = client.submit(Generate(corrupt_png(), SETTINGS))  # the header passes the protocol, the pixels do not
        final = last(client.events(job_id, timeout=60))
        assert isinstance(final, Error) and final.code == ErrorCode.INVALID_IMAGE and final.hint
        assert server.store.get(job_id).state == "error"
        assert isinstance(client.generate(png(), SETTINGS, timeout=60), Result)


@pytest.mark.parametrize("request_of, words", [
    (lambda: Generate(png(), {"seed": "one"}), "seed"),
    (lambda: Generate(png(), {"seed": True}), "seed"),
    (lambda: Generate(png(), {"faces": "100"}), "faces"),
    (lambda: Generate(png(), {"bogus": 1}), "bogus"),
    (lambda: Generate(png(), {"shape_steps": 0}), "shape_steps"),
    (lambda: Generate(png(), {"shape_guidance_strength": [1.0]}), "shape_guidance_strength"),
    (lambda: Generate(png(), {"texture_size": 300}), "texture_size"),
    (lambda: Reprocess("abc", {"seed": 2}), "seed"),
])
def test_bad_settings_are_refused_at_submit_naming_the_setting(server, request_of, words):
    with connect(server.endpoint) as client:
        client.hello()
        with pytest.raises(RemoteError) as refused:
            client.submit(request_of())
    assert refused.value.code == ErrorCode.INVALID_SETTINGS and words in refused.value.message
    assert not server.store.pending()


def test_a_reprocess_of_no_valid_job_id_never_leaves_the_client():
    with pytest.raises(MalformedMessage, match="source_job_id"):
        Reprocess("../etc")


def test_info_advertises_the_settings_schema_with_the_checkpoints_defaults(server):
    with connect(server.endpoint) as client:
        schema = Schema.from_wire(client.hello().settings)
    assert schema == server.worker.schema
    assert schema["texture_guidance_interval_end"].default == 0.9  # the tiny checkpoint's pipeline.json


def test_queue_full_is_refused_and_queue_length_reported(server, controls):
    controls.gate.clear()
    with connect(server.endpoint) as client:
        client.hello()
        running = client.submit(Generate(png(), SETTINGS))
        wait_for_stage(client, running, HELD_STAGE)
        waiting = [client.submit(Generate(png(), SETTINGS)) for _ in range(server.config.max_queue)]
        with pytest.raises(RemoteError) as refused:
            client.submit(Generate(png(), SETTINGS))
        assert refused.value.code == ErrorCode.QUEUE_FULL
        assert client.info(refresh=True).queue_length == 1 + server.config.max_queue
        for job_id in [*waiting, running]:
            client.cancel(job_id)
        for job_id in [*waiting, running]:
            assert last(client.events(job_id, timeout=20)) == Cancelled(job_id)


def test_reprocess_rebuilds_the_asset_without_generating(server):
    with connect(server.endpoint) as client:
        client.hello()
        first = client.generate(png(), SETTINGS, timeout=60)
        job_id = client.submit(Reprocess(first.job_id, {"faces": 1000, "texture_size": 512}))
        events = list(client.events(job_id, timeout=60))
        with pytest.raises(RemoteError) as refused:
            client.submit(Reprocess("never-generated"))
    result = events[-1]
    assert isinstance(result, Result) and result.job_id == job_id
    generation = {s.name for ptype in PIPELINE_TYPES.values() for s in ptype.stages}
    assert not {m.stage for m in events if isinstance(m, Progress)} & generation
    assert result.textures["base_color"].shape == (512, 512, 4)
    assert result.metadata["reprocessed_from"] == first.job_id
    assert result.metadata["ovoxel"] == first.metadata["ovoxel"]
    assert refused.value.code == ErrorCode.UNKNOWN_JOB


def test_a_result_too_large_for_the_client_becomes_an_error_and_stays_fetchable(server):
    with connect(server.endpoint, limits=Limits(max_frame_bytes=100_000)) as small:
        small.hello()
        job_id = small.submit(Generate(png(), SETTINGS))  # its 256x256 RGBA texture is 262144 bytes
        final = last(small.events(job_id, timeout=60))
    assert isinstance(final, Error) and final.code == ErrorCode.LIMIT_EXCEEDED and final.job_id == job_id
    assert "max_frame_bytes" in final.message and not server.store.get(job_id).delivered
    with connect(server.endpoint) as big:
        big.hello()
        assert isinstance(big.fetch(job_id, timeout=30), Result)
    wait_until(lambda: server.store.get(job_id).delivered, 5, "the delivery to be recorded")
