"""encode(message) -> frames and decode(frames) -> message.

Frame 0 is a msgpack map {"v": version, "type": name, "body": {plain fields}, "frames": [descriptors]};
every later frame is raw bytes (the image, or one array each) described by one descriptor. Decoding
treats its input as hostile: sizes are checked before anything is parsed, msgpack runs with hard
limits, and any failure comes out as a ProtocolError subclass, never as another exception type.
"""

from __future__ import annotations

from dataclasses import fields
from enum import Enum
from typing import Any, Sequence

import msgpack
import zmq

from .arrays import from_wire, to_wire
from .errors import LimitExceeded, MalformedMessage, ProtocolError
from .images import check_image
from .limits import DEFAULT_LIMITS, Limits, Role
from .messages import MESSAGE_TYPES, Message, Texture, WorkerStatus, binary_fields
from .version import PROTOCOL_VERSION, check_version

HEADER_KEYS = {"v", "type", "body", "frames"}
_BYTES_KEYS = {"frame", "field"}
_ARRAY_KEYS = {"frame", "field", "name", "dtype", "shape"}

Frame = bytes | memoryview | zmq.Frame


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """Frames for `msg`, ready for `socket.send_multipart(frames, copy=False)`.

    Arrays are sent from their own memory when already C-contiguous little-endian: do not modify
    them until the send has completed. Limits are checked here too, so an oversized message fails
    with a clear error on the sender instead of being dropped by the receiver's socket.
    """
    kinds = binary_fields(type(msg))
    body: dict[str, Any] = {}
    descriptors: list[dict[str, Any]] = []
    buffers: list[bytes | memoryview] = []
    for f in fields(msg):
        value = getattr(msg, f.name)
        if kinds.get(f.name) == "bytes":
            descriptors.append({"frame": len(buffers) + 1, "field": f.name})
            buffers.append(value)
        elif kinds.get(f.name) == "arrays":
            for name, array in value.items():
                spec, buffer = to_wire(array, limits)
                descriptors.append({"frame": len(buffers) + 1, "field": f.name, "name": name, **spec})
                buffers.append(buffer)
        else:
            body[f.name] = _plain(value)
    _check_request(msg, limits)
    header = msgpack.packb({"v": PROTOCOL_VERSION, "type": msg.TYPE, "body": body, "frames": descriptors},
                           use_bin_type=True)
    _check_sizes([len(header), *(memoryview(b).nbytes for b in buffers)], limits)
    return [header, *buffers]


def decode(frames: Sequence[Frame], limits: Limits = DEFAULT_LIMITS, *, sender: Role | None = None) -> Message:
    """The message in `frames` (envelope already removed, see `split_envelope`).

    `sender` ("client" or "server"), when given, rejects messages the other side may not send.
    Arrays in the result are read-only zero-copy views of the frames. Raises only ProtocolError.
    """
    try:
        return _decode(frames, limits, sender)
    except ProtocolError:
        raise
    except Exception as exc:  # last line of defence: hostile input must never escape as another type
        raise MalformedMessage(f"undecodable message ({type(exc).__name__}: {exc})") from exc


def frame_view(frame: Frame) -> memoryview:
    """A flat byte view of a frame as received (zmq.Frame) or produced (bytes, memoryview)."""
    view = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _decode(frames: Sequence[Frame], limits: Limits, sender: Role | None) -> Message:
    if not isinstance(frames, (list, tuple)) or not frames:
        raise MalformedMessage("a message needs at least its header frame")
    views = [frame_view(f) for f in frames]
    _check_sizes([v.nbytes for v in views], limits)
    header = _unpack_header(views[0], limits)

    version = header.get("v")
    if type(version) is not int:
        raise MalformedMessage("header lacks an integer protocol version 'v'")
    check_version(version)
    if set(header) != HEADER_KEYS:
        raise MalformedMessage(f"header keys must be {sorted(HEADER_KEYS)}, got {sorted(map(str, header))}")
    cls = MESSAGE_TYPES.get(header["type"]) if type(header["type"]) is str else None
    if cls is None:
        raise MalformedMessage(f"unknown message type {header['type']!r:.60}; known: {', '.join(MESSAGE_TYPES)}")
    if sender is not None and cls.SENT_BY != sender:
        raise MalformedMessage(f"'{cls.TYPE}' is sent by the {cls.SENT_BY}, not by the {sender}")

    body, kinds = header["body"], binary_fields(cls)
    expected = {f.name for f in fields(cls)} - set(kinds)
    if not isinstance(body, dict) or set(body) != expected:
        got = sorted(map(str, body)) if isinstance(body, dict) else type(body).__name__
        raise MalformedMessage(f"'{cls.TYPE}' body must have the fields {sorted(expected)}, got {got}")
    values = dict(body)
    values.update(_binaries(cls, kinds, header["frames"], views[1:], limits))
    msg = cls(**values)
    _check_request(msg, limits)
    return msg


def _check_request(msg: Message, limits: Limits) -> None:
    """What a request's binaries must satisfy beyond their frames: a readable image, a mesh within its limit."""
    if "image" in binary_fields(type(msg)):
        check_image(msg.image, limits)
    if isinstance(msg, Texture):
        size = sum(a.nbytes for a in msg.mesh.values())
        if size > limits.max_mesh_bytes:
            raise LimitExceeded("max_mesh_bytes", size, limits.max_mesh_bytes,
                                hint="send a simpler mesh (decimate it) or ask the server for a larger limit")


def _unpack_header(view: memoryview, limits: Limits) -> dict:
    if view.nbytes == 0:
        raise MalformedMessage("empty header frame")
    try:
        header = msgpack.unpackb(
            view, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limits.max_header_bytes, max_bin_len=limits.max_header_bytes,
            max_array_len=limits.max_items, max_map_len=limits.max_items, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ExtraData, StackError, FormatError, ValueError, ...
        raise MalformedMessage(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise MalformedMessage(f"header must be a msgpack map, got {type(header).__name__}")
    return header


def _binaries(cls: type[Message], kinds: dict[str, str], descriptors: Any, buffers: list[memoryview],
              limits: Limits) -> dict[str, Any]:
    """Match frame descriptors to frames; each frame is described exactly once."""
    if type(descriptors) is not list or len(descriptors) != len(buffers):
        count = len(descriptors) if type(descriptors) is list else type(descriptors).__name__
        raise MalformedMessage(f"header describes {count} binary frames, {len(buffers)} arrived")
    out: dict[str, Any] = {name: {} for name, kind in kinds.items() if kind == "arrays"}
    used: set[int] = set()
    for desc in descriptors:
        field = desc.get("field") if isinstance(desc, dict) else None
        kind = kinds.get(field) if type(field) is str else None
        if kind is None:
            raise MalformedMessage(f"frame descriptor {desc!r:.100} names no binary field of '{cls.TYPE}' "
                                   f"(binary fields: {sorted(kinds)})")
        if set(desc) != (_BYTES_KEYS if kind == "bytes" else _ARRAY_KEYS):
            raise MalformedMessage(f"frame descriptor for {cls.TYPE}.{field} has keys {sorted(map(str, desc))}")
        index = desc["frame"]
        if type(index) is not int or not 1 <= index <= len(buffers) or index in used:
            raise MalformedMessage(f"frame descriptor for {cls.TYPE}.{field} has a bad or repeated frame index "
                                   f"{index!r:.30}")
        used.add(index)
        buffer = buffers[index - 1]
        if kind == "bytes":
            if field in out:
                raise MalformedMessage(f"{cls.TYPE}.{field} is described twice")
            out[field] = bytes(buffer)
            continue
        name = desc["name"]
        if type(name) is not str or name in out[field]:
            raise MalformedMessage(f"{cls.TYPE}.{field} has a bad or repeated array name {name!r:.60}")
        out[field][name] = from_wire(desc["dtype"], desc["shape"], buffer, limits)
    missing = [name for name, kind in kinds.items() if kind == "bytes" and name not in out]
    if missing:
        raise MalformedMessage(f"'{cls.TYPE}' lacks its {', '.join(missing)} frame")
    return out


def _check_sizes(sizes: list[int], limits: Limits) -> None:
    """Sizes of [header, *binary frames], checked before anything is parsed."""
    if len(sizes) - 1 > limits.max_arrays:
        raise LimitExceeded("max_arrays", len(sizes) - 1, limits.max_arrays)
    if sizes[0] > limits.max_header_bytes:
        raise LimitExceeded("max_header_bytes", sizes[0], limits.max_header_bytes,
                            hint="keep settings and metadata small (large data belongs in arrays)")
    for size in sizes:
        if size > limits.max_frame_bytes:
            raise LimitExceeded("max_frame_bytes", size, limits.max_frame_bytes)
    if sum(sizes) > limits.max_message_bytes:
        raise LimitExceeded("max_message_bytes", sum(sizes), limits.max_message_bytes)


def _plain(value: Any) -> Any:
    """Header-safe form of a field value (enums by value, records such as Limits as maps)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (Limits, WorkerStatus)):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
