"""Test helpers: sample messages and a tiny ROUTER server thread built on the protocol's server helpers."""

from __future__ import annotations

import queue
import struct
import threading
import zlib
from dataclasses import replace
from typing import Callable

import numpy as np
import zmq

from protocol import (DEFAULT_LIMITS, Accepted, Cancel, Cancelled, Error, ErrorCode, Fetch, Hello, Info, Limits,
                      Message, ModelStatus, Ping, Pong, ProtocolError, Progress, Result, Generate, Reprocess, SETTINGS, Texture, configure_socket,
                      WorkerState, WorkerStatus, decode, encode, join_envelope, split_envelope)


def png_bytes(width: int = 8, height: int = 6, channels: int = 4) -> bytes:
    """A valid 8-bit PNG (gray, RGB or RGBA by `channels`) of black pixels, built without Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = (b"\x00" + bytes(width * channels)) * height  # filter byte 0, then the row's samples
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def sample_messages() -> list[Message]:
    """One or more instances of every message type, with optional fields both set and unset."""
    rng = np.random.default_rng(0)
    return [
        Hello("blender", "4.2.0"),
        Info("trellis2-backend", "0.1.0", "microsoft/TRELLIS.2-4B", ModelStatus.READY, "cuda:0 NVIDIA H100", 3, "a1b2",
             gpu_memory_free=40 << 30, gpu_memory_total=80 << 30, capabilities=["texture", "cancel"],
             limits=Limits(max_image_bytes=1 << 20), details={"torch": "2.13", "cuda": [12, 8]},
             settings=SETTINGS.to_wire(),
             workers=[WorkerStatus("gpu0", "box-1", "cuda:0 NVIDIA H100", WorkerState.BUSY, ["job-1", "job-2"],
                                   ["sparse_structure_flow_model"], 0, 4242),
                      WorkerStatus("ray3", "box-2", "cuda", WorkerState.RESTARTING, restarts=2,
                                   error="was killed by SIGKILL")]),
        Info("b", "0", "m", ModelStatus.LOADING, "cpu", 0, "c3"),
        Generate(png_bytes(), {"seed": 42, "steps": 12, "cfg": 7.5, "name": "chair", "flags": [True, None],
                             "sub": {"deep": {"x": -1}}}, "client-1"),
        Generate(png_bytes(3, 2, 1)),
        Accepted("job-1", 0, "client-1"),
        Accepted("job.2", 5),
        Progress("job-1", "shape", 3, 12, 0.25, "sampling shape"),
        Progress("job-1", "queued", 0, 0, 0.0),
        Result("job-1", mesh={"positions": rng.random((5, 3), dtype=np.float32),
                              "indices": np.arange(9, dtype=np.uint32).reshape(3, 3)},
               textures={"base_color": rng.integers(0, 255, (4, 4, 4), dtype=np.uint8)},
               metadata={"faces": 3, "seconds": 1.5}),
        Result("job-2"),
        Error(ErrorCode.OUT_OF_MEMORY, "CUDA out of memory", "lower the resolution", "job-1", "client-1"),
        Error(ErrorCode.MALFORMED_MESSAGE, "bad"),
        Cancel("job-1"),
        Cancelled("job-1"),
        Fetch("job-1"),
        Ping(7),
        Pong(7, "a1b2", True),
        Reprocess("job-1", {"faces": 20_000}, "client-2"),
        Reprocess("job-1"),
        Texture(png_bytes(), {"positions": rng.random((4, 3), dtype=np.float32),
                              "indices": np.array([[0, 1, 2], [0, 2, 3]], dtype=np.uint32),
                              "uvs": rng.random((6, 2), dtype=np.float32)}, {"seed": 1}, "client-3"),
    ]


def assert_same(a: Message, b: Message) -> None:
    """Field-by-field equality that also compares arrays exactly (dtype, shape, bytes)."""
    assert type(a) is type(b)
    if not isinstance(a, Result):
        assert a == b
        return
    assert (a.job_id, a.metadata) == (b.job_id, b.metadata)
    for name in ("mesh", "textures"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape
            assert x[key].tobytes() == y[key].tobytes()


Handler = Callable[[Message], list[Message]]


class FakeServer:
    """ROUTER server thread. Answers pings itself (with its `instance` and whether the connection said hello);
    everything else goes to `handler`, whose replies are sent back to the asking client (an `info` among them gets
    this server's instance). `mute` makes it a hung server (reads, never answers); `push` sends a message to the
    last client from the server thread; `restart` gives it a new instance and forgets every hello, as a restarted
    server would; `stop` kills it. `address` binds it where an earlier one was."""

    def __init__(self, handler: Handler, limits: Limits = DEFAULT_LIMITS, curve_secret_key: bytes | None = None,
                 address: str | None = None):
        self.handler = handler
        self.limits = limits
        self.received: list[Message] = []
        self.mute = False
        self.instance = "fake-1"
        self._greeted: set[bytes] = set()
        self._outbox: queue.Queue[Message] = queue.Queue()
        self._identity: list = []
        self._stop = threading.Event()
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        configure_socket(self._sock, limits, "server")
        if curve_secret_key is not None:
            self._sock.curve_server = True
            self._sock.curve_secretkey = curve_secret_key
        if address is None:
            address = f"tcp://127.0.0.1:{self._sock.bind_to_random_port('tcp://127.0.0.1')}"
        else:
            self._sock.bind(address)
        self.address = address
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def push(self, msg: Message) -> None:
        self._outbox.put(msg)

    def restart(self) -> None:
        self.instance = f"fake-{int(self.instance.rpartition('-')[2]) + 1}"
        self._greeted.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                while not self._outbox.empty():
                    self._send(self._identity, self._outbox.get())
                if not self._sock.poll(10):
                    continue
                identity, frames = split_envelope(self._sock.recv_multipart(copy=False))
                self._identity = identity
                try:
                    msg = decode(frames, self.limits, sender="client")
                except ProtocolError as exc:
                    replies: list[Message] = [Error.from_exception(exc)]
                else:
                    self.received.append(msg)
                    if isinstance(msg, Hello):
                        self._greeted.add(bytes(identity[0]))
                    replies = ([Pong(msg.seq, self.instance, bytes(identity[0]) in self._greeted)]
                               if isinstance(msg, Ping) else self.handler(msg))
                if not self.mute:
                    for reply in replies:
                        self._send(identity, reply)
        finally:
            self._sock.close(linger=0)

    def _send(self, identity: list, msg: Message) -> None:
        if isinstance(msg, Info):
            msg = replace(msg, instance=self.instance)
        self._sock.send_multipart(join_envelope(identity, encode(msg, self.limits)), copy=False)


def info_for(limits: Limits = DEFAULT_LIMITS) -> Info:
    return Info("fake", "0.0", "tiny", ModelStatus.READY, "cpu", 0, "fake-1", limits=limits)


def standard_handler(msg: Message) -> list[Message]:
    """A well-behaved backend: one job id per submit, progress, cancel and fetch answered."""
    if isinstance(msg, Hello):
        return [info_for()]
    if isinstance(msg, Generate):
        return [Accepted("job-1", 0, msg.client_job_id), Progress("job-1", "shape", 1, 2, 0.5)]
    if isinstance(msg, Cancel):
        return [Cancelled(msg.job_id)]
    if isinstance(msg, Fetch):
        return [Result(msg.job_id, mesh={"positions": np.ones((2, 3), np.float32)})]
    return []
