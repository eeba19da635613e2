"""Access: every connection, loopback included, is authenticated with CURVE (a loopback server makes its keys on first
start, private to its user); no keys, no start beyond loopback; jobs belong to their owner's key; the store is
private; queued inputs count toward its cap."""

from __future__ import annotations

import argparse
import os
import stat
import threading

import pytest
import zmq

from backend.server.auth import SecurityError, is_local, make_keys, register
from backend.server.server import Server, ServerConfig, serve_command
from protocol import (BackendUnreachable, Cancelled, Error, ErrorCode, Generate, ModelStatus, RemoteError,
                      Reprocess, Result)
from protocol.keys import client_curve as load_client_keys
from protocol.keys import local_client_curve
from server_testkit import (FAST_ASSET, HELD_STAGE, connect, last, no_models, other_keys, png, serve_in_thread,
                            stop_served, wait_for_stage, wait_until)


@pytest.fixture
def secure_server(tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys, "blender")
    server, thread = serve_in_thread(ServerConfig(bind="tcp://127.0.0.1:*", store=tmp_path / "store", keys=keys))
    yield server, keys
    stop_served(server, thread)


def test_curve_lets_in_only_authorised_clients(secure_server):
    server, keys = secure_server
    allowed = load_client_keys(keys / "server.key", keys / "client-secrets" / "blender.key_secret")
    with connect(server.endpoint, allowed) as client:
        info = client.hello()
        assert info.details["curve"] is True
        wait_until(lambda: client.info(refresh=True).model_status == ModelStatus.FAILED, 30, "the load to fail")
        assert "no models" in client.info().details["model_error"]
        with pytest.raises(RemoteError) as refused:  # failed models: a clear refusal, not a hang
            client.submit(Generate(png()))
        assert refused.value.code == ErrorCode.MODEL_NOT_READY and "no models" in refused.value.message

    stranger = {"curve_server_key": allowed["curve_server_key"], "curve_client_keys": zmq.curve_keypair()}
    for intruder in (stranger, {}):  # an unknown keypair; no encryption at all
        with connect(server.endpoint, intruder, heartbeat_interval=0.2, dead_after=1.5) as client:
            with pytest.raises(BackendUnreachable):
                client.hello()


def test_no_keys_no_start_beyond_loopback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the default key folder is empty
    server = Server(ServerConfig(bind="tcp://0.0.0.0:5555", store=tmp_path / "store"), no_models)
    with pytest.raises(SecurityError, match="refusing to start.*reachable from other machines.*backend keys"):
        server.start()
    assert not (tmp_path / "store").exists(), "it refuses before touching anything"

    parser = argparse.ArgumentParser()
    from backend.server.server import register as register_serve

    register_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--bind", "tcp://*:5555", "--store", str(tmp_path / "store")])
    assert serve_command(args) == 2 and "refusing to start" in capsys.readouterr().err

    (tmp_path / "keys").mkdir()
    make_keys(tmp_path / "keys")
    (tmp_path / "keys" / "clients" / "blender.key").unlink()  # keys, but nobody allowed in
    with pytest.raises(SecurityError, match="no client public keys"):
        Server(ServerConfig(bind="tcp://0.0.0.0:5555", store=tmp_path / "store", keys=tmp_path / "keys")).start()


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.2:1", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/trellis2.sock", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://192.168.1.5:5555", False),
    ("tcp://eth0:5555", False), ("tcp://[::]:5555", False), ("udp://127.0.0.1:5", False),
])
def test_what_counts_as_local(endpoint, local):
    assert is_local(endpoint) is local


def test_keys_command_keeps_existing_keys_and_adds_clients(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    folder = tmp_path / "keys"
    run = lambda *extra: (args := parser.parse_args(["keys", "--dir", str(folder), *extra])).run(args)  # noqa: E731
    assert run() == 0
    secret = (folder / "server.key_secret").read_bytes()
    assert run("--client", "laptop") == 0 and run() == 0
    assert (folder / "server.key_secret").read_bytes() == secret, "running it again must not lock clients out"
    assert sorted(p.name for p in (folder / "clients").iterdir()) == ["blender.key", "laptop.key"]
    assert (folder / "client-secrets" / "laptop.key_secret").stat().st_mode & 0o077 == 0
    assert "exist already" in capsys.readouterr().out
    assert run("--client", "../evil") == 2


def test_a_loopback_server_makes_private_keys_and_lets_in_only_their_holders(tmp_path):
    keys = tmp_path / "config" / "keys"
    server, thread = serve_in_thread(ServerConfig(bind="tcp://127.0.0.1:*", store=tmp_path / "store", keys=keys))
    try:
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700
        assert stat.S_IMODE((keys / "client-secrets" / "local.key_secret").stat().st_mode) == 0o600
        with connect(server.endpoint, local_client_curve(keys)) as client:
            assert client.hello().details["curve"] is True
        stranger = {"curve_server_key": local_client_curve(keys)["curve_server_key"],
                    "curve_client_keys": zmq.curve_keypair()}
        for intruder in ({}, stranger):  # another local user: no keys, or keys of its own
            with connect(server.endpoint, intruder, heartbeat_interval=0.2, dead_after=1.5) as client:
                with pytest.raises(BackendUnreachable):
                    client.hello()
    finally:
        stop_served(server, thread)


def test_a_key_folder_others_can_read_is_refused(tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys, "local")
    os.chmod(keys, 0o755)
    with pytest.raises(SecurityError, match="not private to its owner.*chmod 700"):
        Server(ServerConfig(bind="tcp://127.0.0.1:*", store=tmp_path / "store", keys=keys), no_models).start()


def test_no_auth_is_for_loopback_only_and_hides_versions(tmp_path):
    with pytest.raises(SecurityError, match="--no-auth is for loopback only"):
        Server(ServerConfig(bind="tcp://0.0.0.0:5555", store=tmp_path / "s1", auth=False), no_models).start()
    server, thread = serve_in_thread(ServerConfig(bind="tcp://127.0.0.1:*", store=tmp_path / "s2", auth=False))
    try:
        with connect(server.endpoint, {}) as client:
            info = client.hello()
        assert info.server_version == "" and "python" not in info.details and info.details["curve"] is False
    finally:
        stop_served(server, thread)


def test_the_store_is_private_to_the_servers_user(server):
    with connect(server.endpoint) as client:
        client.hello()
        job_id = client.generate(png(), {"seed": 2, **FAST_ASSET}, timeout=60).job_id
    wait_until(lambda: server.store.get(job_id).delivered, 10, "the delivery to be recorded (its last write)")
    root = server.store.root
    folders = [root, root / "jobs", root / "jobs" / job_id]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o700 for f in folders)
    files = [f for f in (root / "jobs" / job_id).iterdir()] + [root / "lock"]
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


def test_jobs_belong_to_their_owner_and_every_follower_gets_the_events(server, controls):
    controls.gate.clear()
    endings: dict[str, object] = {}
    with connect(server.endpoint) as owner, connect(server.endpoint) as second, \
            connect(server.endpoint, other_keys()) as stranger:
        for client in (owner, second, stranger):
            client.hello()
        job_id = owner.submit(Generate(png(), {"seed": 3, **FAST_ASSET}))
        wait_for_stage(owner, job_id, HELD_STAGE)
        refused = [stranger.fetch(job_id, timeout=10)]
        stranger.cancel(job_id)
        refused.append(last(stranger.events(job_id, timeout=10)))
        assert all(isinstance(r, Error) and r.code == ErrorCode.UNKNOWN_JOB for r in refused)
        with pytest.raises(RemoteError) as reprocess:
            stranger.submit(Reprocess(job_id))
        assert reprocess.value.code == ErrorCode.UNKNOWN_JOB
        assert server.worker.running() == [job_id], "another owner's cancel did nothing"

        follower = threading.Thread(target=lambda: endings.update(second=second.fetch(job_id, timeout=60)))
        follower.start()  # the owner's second connection follows the job too: no takeover
        wait_until(lambda: len(server._followers.of(job_id)) == 2, 10, "two followers")
        controls.gate.set()
        endings["owner"] = last(owner.events(job_id, timeout=60))
        follower.join(60)
    assert all(isinstance(e, Result) and e.job_id == job_id for e in endings.values()) and len(endings) == 2


def test_a_submit_sent_again_gets_the_job_it_made(server, controls):
    controls.gate.clear()
    with connect(server.endpoint) as first, connect(server.endpoint) as again:
        first.hello()
        again.hello()
        job_id = first.submit(Generate(png(), {"seed": 4, **FAST_ASSET}, "same-request"))
        assert again.submit(Generate(png(), {"seed": 4, **FAST_ASSET}, "same-request")) == job_id
        first.cancel(job_id)
        assert last(first.events(job_id, timeout=20)) == Cancelled(job_id)
        assert last(again.events(job_id, timeout=20)) == Cancelled(job_id), "the repeat follows the job too"
    assert sum(r.client_job_id == "same-request" for r in server.store.pending()) == 0


def test_queued_inputs_count_toward_the_store_cap(server, controls):
    controls.gate.clear()
    image = png(size=128)
    cap = server.store.max_bytes
    with connect(server.endpoint) as client:
        client.hello()
        running = client.submit(Generate(image, {"seed": 5, **FAST_ASSET}))
        wait_for_stage(client, running, HELD_STAGE)
        queued_bytes = sum(r.size for r in server.store.pending())
        server.store.max_bytes = queued_bytes + len(image) + 2000  # room for one more input and its record, once
        # the ended jobs are purged to make room (queued ones never are)
        try:
            queued = client.submit(Generate(image, {"seed": 5, **FAST_ASSET}))
            with pytest.raises(RemoteError) as refused:
                client.submit(Generate(image, {"seed": 5, **FAST_ASSET}))
        finally:
            server.store.max_bytes = cap
        assert refused.value.code == ErrorCode.QUEUE_FULL and "job store is full" in refused.value.message
        for job_id in (queued, running):
            client.cancel(job_id)
            assert last(client.events(job_id, timeout=20)) == Cancelled(job_id)
