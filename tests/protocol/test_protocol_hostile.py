"""Hostile input: every way to break a message must end in a ProtocolError subclass, nothing else."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (DEFAULT_LIMITS, PROTOCOL_VERSION, Generate, InvalidArray, InvalidImage, LimitExceeded, Limits,
                      MalformedMessage, ProtocolError, ProtocolVersionError, Result, decode, encode)
from protocol_fakes import png_bytes, sample_messages

SAMPLES = [encode(m) for m in sample_messages()]
RESULT = sample_messages()[9]
GENERATE = next(m for m in sample_messages() if isinstance(m, Generate))


def header_of(frames: list) -> dict:
    return msgpack.unpackb(frames[0])


def with_header(frames: list, header: dict) -> list:
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def result_frames(**descriptor_changes) -> list:
    """The sample Result with its first array descriptor changed."""
    frames = encode(RESULT)
    header = header_of(frames)
    header["frames"][0].update(descriptor_changes)
    return with_header(frames, header)


def test_random_bytes_header():
    with pytest.raises(MalformedMessage, match="msgpack"):
        decode([b"\xc1\x00garbage"])


@pytest.mark.parametrize("frames", SAMPLES[:4], ids=["hello", "info", "info-min", "submit"])
def test_every_truncation_of_a_header_is_refused(frames):
    header = bytes(frames[0])
    for end in range(len(header)):
        with pytest.raises(MalformedMessage):
            decode([header[:end], *frames[1:]])


def test_trailing_bytes_after_the_header():
    frames = SAMPLES[0]
    with pytest.raises(MalformedMessage, match="ExtraData"):
        decode([frames[0] + b"\xc0"])


@pytest.mark.parametrize("header", [[1, 2], 5, "text", None, {}, {"v": "1"}, {"v": True}, {"v": 1.0},
                                    {"v": PROTOCOL_VERSION}, {"v": PROTOCOL_VERSION, "type": "ping", "body": {}},
                                    {"v": PROTOCOL_VERSION, "type": "ping", "body": {"seq": 1}, "frames": [],
                                     "extra": 1}])
def test_header_structure(header):
    with pytest.raises(MalformedMessage):
        decode([msgpack.packb(header)])


@pytest.mark.parametrize("remote", [0, PROTOCOL_VERSION + 1, 99, -(2**63)])
def test_version_mismatch_names_both_versions(remote):
    header = {"v": remote, "type": "whatever-a-future-version-sends", "anything": [1, 2]}
    with pytest.raises(ProtocolVersionError) as info:
        decode([msgpack.packb(header)])
    err = info.value
    assert (err.local_version, err.remote_version, err.code.value) == (PROTOCOL_VERSION, remote, "version_mismatch")
    assert f"version {remote}" in err.message and f"version {PROTOCOL_VERSION}" in err.message
    assert "same release" in err.hint


@pytest.mark.parametrize("kind", ["unknown", 7, None, ""])
def test_unknown_message_type(kind):
    header = header_of(SAMPLES[0])
    header["type"] = kind
    with pytest.raises(MalformedMessage, match="unknown message type"):
        decode(with_header(SAMPLES[0], header))


WRONG = {str: 1, int: "1", float: "0.5", bool: 2, type(None): True, dict: [1], list: {"a": 1}}


@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=[type(m).TYPE for m in sample_messages()])
def test_wrong_field_types_missing_and_extra_fields(index):
    frames = SAMPLES[index]
    body = header_of(frames)["body"]
    variants = []
    for name, value in body.items():
        for wrong in (WRONG[type(value)], b"raw-bytes", True if type(value) is int else [value]):
            variants.append({**body, name: wrong})
        variants.append({k: v for k, v in body.items() if k != name})
    variants.append({**body, "unexpected": 1})
    for variant in variants:
        header = header_of(frames)
        header["body"] = variant
        with pytest.raises(MalformedMessage):
            decode(with_header(frames, header))


@pytest.mark.parametrize("mutate", [
    lambda f: f + [b"extra"],  # a frame nobody described
    lambda f: f[:-1],  # a described frame missing
    lambda f: [f[0]],
])
def test_frame_count_must_match_descriptors(mutate):
    with pytest.raises(MalformedMessage, match="binary frames"):
        decode(mutate(encode(RESULT)))


@pytest.mark.parametrize("change,error", [
    ({"frame": 2, "dtype": "uint32", "shape": [3, 3]}, MalformedMessage),  # fits frame 2, repeats its index
    ({"frame": 0}, MalformedMessage),
    ({"frame": 9}, MalformedMessage),
    ({"frame": "1"}, MalformedMessage),
    ({"field": "metadata"}, MalformedMessage),
    ({"field": 3}, MalformedMessage),
    ({"name": "indices"}, MalformedMessage),  # repeated name
    ({"name": "../../etc"}, MalformedMessage),
    ({"name": None}, MalformedMessage),
    ({"extra": 1}, MalformedMessage),
    ({"dtype": "float128"}, InvalidArray),
    ({"dtype": "complex64"}, InvalidArray),
    ({"dtype": "<f4"}, InvalidArray),
    ({"dtype": 5}, InvalidArray),
    ({"shape": [5, 4]}, InvalidArray),
    ({"shape": [-5, -3]}, InvalidArray),
    ({"shape": [5.0, 3.0]}, InvalidArray),
    ({"shape": "5x3"}, InvalidArray),
    ({"shape": [True, 3]}, InvalidArray),
    ({"shape": [1] * 9}, LimitExceeded),
    ({"shape": [2**62, 2**62]}, LimitExceeded),
    ({"shape": [0, 2**63 - 1]}, LimitExceeded),
    ({"dtype": "float64"}, InvalidArray),  # 60 bytes of float32 are not 15 float64s
])
def test_bad_array_descriptors(change, error):
    with pytest.raises(error):
        decode(result_frames(**change))


def test_bool_arrays_hold_only_zero_and_one():
    frames = encode(Result("j", mesh={"mask": np.array([True, False])}))
    with pytest.raises(InvalidArray, match="bool"):
        decode([frames[0], b"\x01\x02"])


def test_image_frames_are_sniffed_and_required():
    frames = encode(GENERATE)
    with pytest.raises(InvalidImage):
        decode([frames[0], b"not an image"])
    header = header_of(frames)
    header["frames"] = []
    with pytest.raises(MalformedMessage, match="image"):
        decode(with_header(frames, header)[:1])
    header["frames"] = [{"frame": 1, "field": "image"}, {"frame": 2, "field": "image"}]
    with pytest.raises(MalformedMessage, match="twice"):
        decode([*with_header(frames, header), png_bytes()])


@pytest.mark.parametrize("fraction", [math.nan, math.inf, -math.inf, -0.1, 1.01])
def test_progress_fraction_must_be_a_finite_fraction(fraction):
    frames = SAMPLES[7]
    header = header_of(frames)
    header["body"]["fraction"] = fraction
    with pytest.raises(MalformedMessage, match="fraction"):
        decode(with_header(frames, header))


@pytest.mark.parametrize("value,ok", [(math.nan, False), (2**64 - 1, False), (2**63, False), (-(2**63), True)])
def test_nan_in_settings_and_ints_beyond_64_bits(value, ok):
    header = header_of(SAMPLES[3])
    header["body"]["settings"] = {"x": value}
    frames = with_header(SAMPLES[3], header)
    if ok:
        assert decode(frames).settings == {"x": value}
        return
    with pytest.raises(MalformedMessage, match="settings"):
        decode(frames)


@pytest.mark.parametrize("depth", [9, 50, 1024, 100_000])
def test_deeply_nested_msgpack(depth):
    header = header_of(SAMPLES[3])
    header["body"]["settings"] = {"x": None}
    packed = msgpack.packb(header)
    nested = b"\x91" * depth + b"\xc0"  # [[[...[None]...]]]
    with pytest.raises(MalformedMessage):
        decode([packed.replace(b"\xa1x\xc0", b"\xa1x" + nested), *SAMPLES[3][1:]])


@pytest.mark.parametrize("declared", [
    b"\xdd\xff\xff\xff\xff",  # array32 of 4 billion entries
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xdd\x00\x01\x00\x00" + b"\xc0" * 65536,  # 65536 real entries, allowed by size but not by max_items
])
def test_huge_declared_lengths_allocate_nothing(declared):
    header = b"\x84\xa1v" + bytes([PROTOCOL_VERSION]) + b"\xa4type\xa4ping\xa4body\x81\xa3seq" + declared
    with pytest.raises(MalformedMessage, match="msgpack"):
        decode([header], Limits(max_items=1000))


def test_timestamps_and_ext_types_are_refused():
    ping = bytes(SAMPLES[16][0])
    stamped = ping.replace(b"\xa3seq\x07", b"\xa3seq\xd6\xff\x00\x00\x00\x01")
    assert stamped != ping
    with pytest.raises(MalformedMessage):
        decode([stamped])


def test_size_limits_name_the_limit():
    frames = encode(RESULT)
    cases = [
        (Limits(max_frame_bytes=59), "max_frame_bytes"),
        (Limits(max_header_bytes=100), "max_header_bytes"),
        (Limits(max_arrays=2), "max_arrays"),
        (Limits(max_message_bytes=300), "max_message_bytes"),
        (Limits(max_array_elements=14), "max_array_elements"),
        (Limits(max_array_ndim=1), "max_array_ndim"),
    ]
    for limits, name in cases:
        with pytest.raises(LimitExceeded) as info:
            decode(frames, limits)
        assert info.value.limit == name and f"Limits.{name}" in info.value.hint
        assert info.value.value > info.value.maximum == getattr(limits, name)


def test_sender_direction_is_enforced():
    with pytest.raises(MalformedMessage, match="sent by the server"):
        decode(encode(RESULT), sender="client")
    with pytest.raises(MalformedMessage, match="sent by the client"):
        decode(SAMPLES[3], sender="server")


@pytest.mark.parametrize("frames", ["text", b"bytes", [], [123], [None], (b"",), [np.zeros(0)], {"a": b"x"}])
def test_non_frame_input(frames):
    with pytest.raises(ProtocolError):
        decode(frames)


# ---- property-based fuzzing ------------------------------------------------------------------------


def decodes_or_fails_cleanly(frames: list, limits: Limits = DEFAULT_LIMITS) -> None:
    """The property: decode either raises a ProtocolError or returns a message that re-encodes."""
    try:
        msg = decode(frames, limits)
    except ProtocolError:
        return
    encode(msg, limits)


FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=120), max_size=5))
def test_fuzz_random_frames(frames):
    decodes_or_fails_cleanly(frames)


@FUZZ
@given(st.sampled_from(range(len(SAMPLES))), st.data())
def test_fuzz_byte_mutations_of_valid_messages(index, data):
    frames = [bytes(f) for f in SAMPLES[index]]
    target = data.draw(st.integers(0, len(frames) - 1))
    raw = bytearray(frames[target])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[pos:pos + data.draw(st.integers(1, 8))]
        else:
            del raw[pos:]
    frames[target] = bytes(raw)
    decodes_or_fails_cleanly(frames, Limits(max_items=1000))


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from(range(len(SAMPLES))), st.data())
def test_fuzz_structural_mutations_of_valid_headers(index, data):
    """Replace one value anywhere in a valid header (or add/remove a key) with arbitrary msgpack."""
    frames = SAMPLES[index]
    header = header_of(frames)
    node = header
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys)) if keys else None
        if key is None or not isinstance(node[key], (dict, list)) or data.draw(st.booleans()):
            break
        node = node[key]
    action = data.draw(st.sampled_from(["replace", "add", "remove"]))
    if action == "add" and isinstance(node, dict):
        node[data.draw(st.text(max_size=8))] = data.draw(MSGPACK_VALUES)
    elif action == "remove" and key is not None:
        del node[key]
    elif key is not None:
        node[key] = data.draw(MSGPACK_VALUES)
    decodes_or_fails_cleanly(with_header(frames, header))
