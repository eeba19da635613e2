"""Helpers for the server tests (fixtures live in conftest.py next to this file).

The shared server's asset step is wrapped with two test controls: a gate that holds a job mid-run (calling
progress, so it can be cancelled there) and a one-shot fault to raise, to check that failures stay with their job.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import zmq
from PIL import Image

from backend.asset.postprocess import build_textured_mesh
from backend.engine import Engine, load_engine
from backend.server.server import Server, ServerConfig
from protocol import Client, Message, Progress, decode, encode, split_envelope
from protocol.keys import client_curve, client_secret_file, default_keys_dir, local_client_curve, server_key_file

FAST_ASSET = {"faces": 1000, "texture_size": 256}  # keeps the real asset step at a fraction of a second
HELD_STAGE = "held"
OTHER_CLIENT = "other"  # a second client keypair the shared server lets in: another owner


class Controls:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.fault: BaseException | None = None

    def reset(self) -> None:
        self.fault = None
        self.gate.set()


def controlled_engine(weights: Path, controls: Controls) -> Engine:
    """The real engine, whose asset builder first raises the pending fault or waits at the gate."""

    def build_asset(ovoxel, settings, progress):
        fault, controls.fault = controls.fault, None
        if fault is not None:
            raise fault
        while not controls.gate.wait(0.01):
            progress(HELD_STAGE, 0, 0)
        return build_textured_mesh(ovoxel, settings, progress, device="cpu")

    return load_engine(str(weights), "cpu", build_asset=build_asset)


def png(seed: int = 0, size: int = 64) -> bytes:
    rgba = (np.random.default_rng(seed).random((size, size, 4)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG")
    return buf.getvalue()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def events_until_ended(client: Client, jobs, timeout: float) -> tuple[list[Message], dict[str, Message]]:
    """(every event seen, the terminal event of each job id in `jobs`), polling as a Blender timer would."""
    seen, ended = [], {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(jobs) and time.monotonic() < deadline:
        msg = client.poll_event(200)
        if msg is not None:
            seen.append(msg)
            if msg.TERMINAL:
                ended[msg.job_id] = msg
    return seen, ended


def corrupt_png() -> bytes:
    """A PNG whose header is fine (the protocol accepts it) but whose pixel data is garbage."""
    data = bytearray(png())
    data[60:400] = bytes(340)
    return bytes(data)


def last(events) -> Message:
    """The final (terminal) message of a job's event stream."""
    msg = None
    for msg in events:
        pass
    return msg


def wait_for_stage(client: Client, job_id: str, stage: str, timeout: float = 60) -> None:
    """Consume the job's events until a progress of `stage` arrives."""
    for msg in client.events(job_id, timeout):
        assert not msg.TERMINAL, f"job ended before reaching stage {stage}: {msg}"
        if isinstance(msg, Progress) and msg.stage == stage:
            return


def local_keys() -> dict:
    """The `local` client keypair a loopback server made in the (test's) default key folder."""
    curve = local_client_curve()
    assert curve is not None, "no server has made the local keys yet"
    return curve


def other_keys() -> dict:
    """OTHER_CLIENT's keypair: a client that owns none of the local client's jobs."""
    folder = default_keys_dir()
    return client_curve(server_key_file(folder), client_secret_file(folder, OTHER_CLIENT))


def connect(endpoint: str, curve: dict | None = None, **kwargs) -> Client:
    """A client patient enough for a loaded 2-core machine, holding the local keys unless `curve` gives others
    ({}: none)."""
    return Client(endpoint, **{"timeout": 30.0, "heartbeat_interval": 0.5, "dead_after": 15.0,
                               **(local_keys() if curve is None else curve), **kwargs})


class RawPeer:
    """A bare DEALER socket (with the local keys, unless `curve` says otherwise), to send what a well-behaved Client
    never would. `identity` fixes its ROUTER identity (the server's name for the connection); `stalled` makes it a
    client that does not read: its libzmq takes one message, then leaves the rest in the server's TCP buffers."""

    def __init__(self, endpoint: str, curve: dict | None = None, identity: bytes | None = None,
                 stalled: bool = False) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        if stalled:
            self.sock.setsockopt(zmq.RCVHWM, 1)
            self.sock.setsockopt(zmq.RCVBUF, 4096)
        curve = local_keys() if curve is None else curve
        if curve:
            public, secret = curve["curve_client_keys"]
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = (
                curve["curve_server_key"], public, secret)
        self.sock.connect(endpoint)

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def send(self, msg: Message) -> None:
        self.send_frames([b"", *encode(msg)])

    def recv(self, timeout: float = 15.0) -> Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        _, frames = split_envelope(self.sock.recv_multipart())
        return decode(frames, sender="server")

    def close(self) -> None:
        self.sock.close(linger=0)


def no_models():
    raise RuntimeError("this test server has no models")


def serve_in_thread(config: ServerConfig, load_models: Callable[[], Engine] = no_models
                    ) -> tuple[Server, threading.Thread]:
    """A server of its own for one test (by default models that fail to load: it refuses jobs); stop it with
    `stop_served`."""
    server = Server(config, load_models)
    server.start()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    return server, thread


def stop_served(server: Server, thread: threading.Thread) -> None:
    server.stop(immediate=True)
    thread.join(30)
    assert not thread.is_alive()
