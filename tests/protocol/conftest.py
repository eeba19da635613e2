"""Fixtures for the protocol tests; helpers live in protocol_fakes.py next to this file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # lets test modules import protocol_fakes in any --import-mode

from protocol_fakes import FakeServer, Handler, standard_handler  # noqa: E402


@pytest.fixture
def make_server():
    """Factory for FakeServers that are all stopped at teardown."""
    servers: list[FakeServer] = []

    def make(handler: Handler = standard_handler, **kwargs) -> FakeServer:
        servers.append(FakeServer(handler, **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()
