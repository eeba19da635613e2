"""CURVE: only clients holding an authorised key get anything; no keys, no start beyond loopback."""

from __future__ import annotations

import argparse
import threading

import pytest
import zmq

from backend.server.auth import SecurityError, is_local, make_keys, register
from protocol.keys import client_curve as load_client_keys
from backend.server.server import Server, ServerConfig, serve_command
from protocol import BackendUnreachable, ErrorCode, Generate, ModelStatus, RemoteError
from server_testkit import connect, png, wait_until


def no_models():
    raise RuntimeError("this test server has no models")


@pytest.fixture
def secure_server(tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys, "blender")
    server = Server(ServerConfig(bind="tcp://127.0.0.1:*", store=tmp_path / "store", keys=keys), no_models)
    server.start()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server, keys
    server.stop(immediate=True)
    thread.join(30)
    assert not thread.is_alive()


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
