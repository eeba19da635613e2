"""Round trips of every message type and the wire layout, plus validation on the sending side."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

import protocol
from protocol import (WorkerState, WorkerStatus, ALLOWED_DTYPES, MESSAGE_TYPES, PROTOCOL_VERSION, Error, ErrorCode, Info, InvalidArray,
                      InvalidImage, LimitExceeded, Limits, MalformedMessage, ModelStatus, Progress, ProtocolError,
                      RemoteError, Result, Generate, configure_socket, decode, encode, join_envelope,
                      split_envelope)
from protocol_fakes import assert_same, png_bytes, sample_messages


def test_samples_cover_every_message_type():
    assert {type(m).TYPE for m in sample_messages()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).TYPE)
def test_every_message_round_trips(msg):
    assert_same(decode(encode(msg)), msg)


def test_header_layout_is_the_documented_contract():
    msg = sample_messages()[9]  # the Result with three arrays
    frames = encode(msg)
    header = msgpack.unpackb(frames[0])
    assert header["v"] == PROTOCOL_VERSION and header["type"] == "result"
    assert set(header["body"]) == {"job_id", "metadata"}
    assert [d["frame"] for d in header["frames"]] == [1, 2, 3]
    assert header["frames"][0] == {"frame": 1, "field": "mesh", "name": "positions", "dtype": "float32",
                                   "shape": [5, 3]}
    assert len(frames) == 4 and memoryview(frames[1]).nbytes == 5 * 3 * 4


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (7,), (3, 4, 2), (1, 1, 1, 1, 1, 1, 1, 1)])
def test_arrays_of_every_dtype_and_shape_round_trip(dtype, shape):
    rng = np.random.default_rng(1)
    array = np.asarray(rng.random(shape) * 100).astype(dtype)
    out = decode(encode(Result("j", mesh={"a": array}))).mesh["a"]
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    assert out.tobytes() == array.tobytes()


def test_non_contiguous_and_big_endian_arrays_are_sent_as_c_order_little_endian():
    base = np.arange(24, dtype=">f8").reshape(4, 6)
    view = base.T[::2]  # strided, Fortran-ish, big-endian
    out = decode(encode(Result("j", mesh={"v": view}))).mesh["v"]
    assert out.dtype == np.dtype("<f8") and out.flags.c_contiguous
    np.testing.assert_array_equal(out, view)


def test_contiguous_arrays_travel_without_copies():
    array = np.arange(1000, dtype=np.float32)
    out = decode(encode(Result("j", mesh={"a": array}))).mesh["a"]
    assert np.shares_memory(out, array)  # encode sent the array's memory, decode viewed the frame


def test_decode_over_zmq_gives_read_only_zero_copy_views():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://codec-zero-copy")
        b.connect("inproc://codec-zero-copy")
        array = np.arange(100_000, dtype=np.float64)  # above pyzmq's copy threshold
        a.send_multipart(encode(Result("j", mesh={"a": array})), copy=False)
        out = decode(b.recv_multipart(copy=False)).mesh["a"]
        np.testing.assert_array_equal(out, array)
        assert not out.flags.writeable and not out.flags.owndata
    finally:
        a.close(linger=0)
        b.close(linger=0)


@pytest.mark.parametrize("dtype", ["complex64", "int8", "float128" if hasattr(np, "float128") else "uint16",
                                   "object", "U3", "datetime64[s]"])
def test_disallowed_dtypes_are_refused_when_building(dtype):
    with pytest.raises(InvalidArray, match="allowed dtypes"):
        Result("j", mesh={"a": np.zeros(3, dtype=dtype)})


def test_settings_are_normalised_and_validated():
    msg = Generate(png_bytes(), {"t": (1, 2), "n": {"m": (True,)}})
    assert msg.settings == {"t": [1, 2], "n": {"m": [True]}}
    bad = [{"b": b"x"}, {"o": object()}, {1: 2}, {"f": math.nan}, {"f": math.inf}, {"i": 1 << 64},
           {"d": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}}]
    for settings in bad:
        with pytest.raises(MalformedMessage):
            Generate(png_bytes(), settings)


@pytest.mark.parametrize("build", [
    lambda: Progress("job", "s", 1, 2, math.nan),
    lambda: Progress("job", "s", 1, 2, 1.5),
    lambda: Progress("job", "s", 3, 2, 0.5),
    lambda: Progress("job", "", 1, 2, 0.5),
    lambda: Progress("job", "s", True, 2, 0.5),
    lambda: Progress("../etc", "s", 1, 2, 0.5),
    lambda: Progress("", "s", 1, 2, 0.5),
    lambda: Progress("j" * 129, "s", 1, 2, 0.5),
    lambda: Info("s", "1", "m", "sleeping", "cpu", 0, "i"),
    lambda: Info("s", "1", "m", ModelStatus.READY, "cpu", -1, "i"),
    lambda: Info("s", "1", "m", ModelStatus.READY, "cpu", 0, "i", workers=[{"name": "w0"}]),
    lambda: Info("s", "1", "m", ModelStatus.READY, "cpu", 0, "i", workers=[WorkerStatus("w", "h", "cpu", "asleep")]),
    lambda: Info("s", "1", "m", ModelStatus.READY, "cpu", 0, "i", workers=[WorkerStatus("w", "h", "cpu", "idle", ["../x"])]),
    lambda: Error("no_such_code", "m"),
    lambda: Generate("not bytes"),
    lambda: Result("j", mesh={"bad name!": np.zeros(1)}),
    lambda: Result("j", mesh={"a": [1, 2]}),
])
def test_invalid_fields_are_refused_when_building(build):
    with pytest.raises(MalformedMessage):
        build()


def test_encode_checks_limits_before_sending():
    small = Limits(max_arrays=2, max_array_elements=10, max_header_bytes=200)
    with pytest.raises(LimitExceeded) as info:
        encode(Result("j", mesh={n: np.zeros(1) for n in "abc"}), small)
    assert info.value.limit == "max_arrays" and info.value.value == 3 and info.value.maximum == 2
    with pytest.raises(LimitExceeded, match="max_array_elements"):
        encode(Result("j", mesh={"a": np.zeros(11)}), small)
    with pytest.raises(LimitExceeded, match="max_header_bytes"):
        encode(Result("j", metadata={"text": "x" * 300}), small)
    with pytest.raises(LimitExceeded, match="max_frame_bytes"):
        encode(Result("j", mesh={"a": np.zeros(9)}), Limits(max_frame_bytes=64))
    with pytest.raises(LimitExceeded, match="max_message_bytes"):
        encode(Result("j", mesh={"a": np.zeros(8), "b": np.zeros(8)}), Limits(max_message_bytes=200))


def test_submit_image_is_checked_on_both_sides():
    with pytest.raises(InvalidImage, match="png, jpeg, webp, bmp, tiff"):
        encode(Generate(b"GIF89a" + bytes(20)))
    big = png_bytes(300, 200)
    with pytest.raises(LimitExceeded) as info:
        encode(Generate(big), Limits(max_image_pixels=50_000))
    assert "300 x 200" in info.value.hint and info.value.value == 60_000
    frames = encode(Generate(big))
    with pytest.raises(LimitExceeded, match="max_image_bytes"):
        decode(frames, Limits(max_image_bytes=len(big) - 1))


def test_error_converts_from_and_to_exceptions():
    exc = LimitExceeded("max_image_bytes", 10, 5)
    reply = decode(encode(Error.from_exception(exc, job_id="job-9")))
    assert reply.code is ErrorCode.LIMIT_EXCEEDED and reply.hint == exc.hint and reply.job_id == "job-9"
    remote = reply.to_exception()
    assert isinstance(remote, RemoteError) and isinstance(remote, ProtocolError)
    assert remote.code is ErrorCode.LIMIT_EXCEEDED and "max_image_bytes" in str(remote)


def test_info_carries_the_servers_limits():
    limits = Limits(max_image_bytes=12345, max_arrays=3)
    info = decode(encode(Info("s", "1", "m", ModelStatus.READY, "cpu", 0, "i", limits=limits)))
    assert info.limits == limits


def test_envelope_split_and_join():
    frames = encode(sample_messages()[0])
    routed = join_envelope([b"id-1", b"id-2"], frames)
    identity, message = split_envelope(routed)
    assert identity == [b"id-1", b"id-2"] and message == frames
    assert split_envelope([b"", *frames]) == ([], frames)
    with pytest.raises(MalformedMessage, match="delimiter"):
        split_envelope(frames)


def test_configure_socket_sets_linger_and_role_specific_maxmsgsize():
    limits = Limits(max_image_bytes=3 << 20, max_mesh_bytes=2 << 20, max_frame_bytes=100 << 20)
    for role, expected in (("server", 3 << 20), ("client", 100 << 20)):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        try:
            configure_socket(sock, limits, role)
            assert sock.getsockopt(zmq.MAXMSGSIZE) == expected and sock.getsockopt(zmq.LINGER) == 0
        finally:
            sock.close()


def test_package_imports_only_msgpack_pyzmq_numpy():
    """The add-on imports this package inside Blender: no torch, no Pillow, nothing else third-party."""
    code = ("import sys, msgpack, zmq, numpy; before = set(sys.modules); import protocol; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(protocol.__file__).parents[1]).stdout
    assert ast.literal_eval(out) == ["protocol"]


def test_info_sums_up_its_workers_for_status_lines():
    busy = WorkerStatus("gpu0", "h", "cuda", WorkerState.BUSY, ["j"])
    idle = WorkerStatus("gpu1", "h", "cuda", WorkerState.IDLE)
    lost = WorkerStatus("gpu2", "h", "cuda", WorkerState.RESTARTING)
    assert Info("s", "1", "m", ModelStatus.READY, "cpu", 0, "i", workers=[busy, idle, lost]).workers_summary() == \
        "3 workers (1 busy, 1 restarting)"
    assert Info("s", "1", "m", ModelStatus.READY, "cpu", 0, "i", workers=[idle]).workers_summary() == "1 worker"
    assert Info("s", "1", "m", ModelStatus.READY, "cpu", 0, "i").workers_summary() == ""
