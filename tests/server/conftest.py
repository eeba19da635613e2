"""Fixtures for the server tests: one server shared by them all (tiny checkpoint, real pipeline and asset step,
on loopback); helpers live in server_testkit.py next to this file."""

from __future__ import annotations

import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lets test modules import server_testkit in any --import-mode

from backend.server.auth import make_keys  # noqa: E402
from backend.server.server import Server, ServerConfig  # noqa: E402
from backend.trellis2.tiny import write_tiny_checkpoint  # noqa: E402
from protocol import ModelStatus  # noqa: E402
from protocol.keys import default_keys_dir  # noqa: E402
from server_testkit import OTHER_CLIENT, Controls, controlled_engine, wait_until  # noqa: E402


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def controls() -> Controls:
    return Controls()


@pytest.fixture(scope="session")
def server(tiny_weights, controls, tmp_path_factory) -> Server:
    """The shared server, in the test's default key folder, which also lets in a second client key, OTHER_CLIENT."""
    make_keys(default_keys_dir(), OTHER_CLIENT)
    config = ServerConfig(bind="tcp://127.0.0.1:*", weights=str(tiny_weights), device="cpu",
                          store=tmp_path_factory.mktemp("store"), max_queue=8, grace_s=0.0)
    # One intra-op thread: two OpenMP threads on a 2-core machine shared with the test's own client threads (and
    # other processes) stall at every barrier and make the tiny jobs 10-100x slower, erratically.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    srv = Server(config, partial(controlled_engine, tiny_weights, controls))
    srv.start()
    thread = threading.Thread(target=srv.serve, name="test-server", daemon=True)
    thread.start()
    wait_until(lambda: srv.worker.status != ModelStatus.LOADING, 60, "the models to load")
    assert srv.worker.status == ModelStatus.READY, srv.worker.load_error
    yield srv
    controls.reset()
    srv.stop(immediate=True)
    thread.join(30)
    torch.set_num_threads(threads)
    assert not thread.is_alive()


@pytest.fixture(autouse=True)
def _reset_controls(controls):
    yield
    controls.reset()
