"""NumPy arrays to and from raw frames: the dtype allow-list, shape checks and zero-copy views.

On the wire an array is its C-order, little-endian bytes in a frame of its own, described in the
header by dtype name and shape. Receiving never copies: the array is a read-only view of the frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidArray, LimitExceeded
from .limits import Limits

ALLOWED_DTYPES = ("uint8", "int32", "uint32", "int64", "float16", "float32", "float64", "bool")
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES}


def dtype_name(array: np.ndarray) -> str:
    """The wire name of `array`'s dtype; raise InvalidArray if it is not in the allow-list."""
    dtype = array.dtype
    if dtype.fields is not None or dtype.subdtype is not None or dtype.name not in _WIRE_DTYPES:
        raise InvalidArray(f"dtype {dtype} is not allowed; allowed dtypes: {', '.join(ALLOWED_DTYPES)}",
                           hint=f"convert with array.astype(...) to one of {', '.join(ALLOWED_DTYPES)}")
    return dtype.name


def check_shape(shape: tuple[int, ...], limits: Limits) -> int:
    """Check ndim and element count against the limits; return the element count."""
    if len(shape) > limits.max_array_ndim:
        raise LimitExceeded("max_array_ndim", len(shape), limits.max_array_ndim)
    count = 1
    for dim in shape:  # each dimension is checked too: shape (0, 2**70) has no elements but no meaning
        count *= dim
        if max(dim, count) > limits.max_array_elements:
            raise LimitExceeded("max_array_elements", max(dim, count), limits.max_array_elements)
    return count


def to_wire(array: np.ndarray, limits: Limits) -> tuple[dict[str, Any], memoryview]:
    """Descriptor fields (dtype, shape) and a byte view of `array`, copying only if it is not
    already C-contiguous little-endian (so big outgoing arrays are sent straight from their memory)."""
    name = dtype_name(array)
    shape = tuple(array.shape)
    check_shape(shape, limits)
    if array.nbytes > limits.max_frame_bytes:
        raise LimitExceeded("max_frame_bytes", array.nbytes, limits.max_frame_bytes)
    wire = np.require(array, dtype=_WIRE_DTYPES[name], requirements="C")
    return {"dtype": name, "shape": list(shape)}, memoryview(wire.reshape(-1).view(np.uint8))


def from_wire(dtype: Any, shape: Any, buffer: memoryview, limits: Limits) -> np.ndarray:
    """Validate a descriptor against its frame and view the frame as the array it describes."""
    if type(dtype) is not str or dtype not in _WIRE_DTYPES:
        raise InvalidArray(f"dtype {dtype!r:.50} is not allowed; allowed dtypes: {', '.join(ALLOWED_DTYPES)}")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidArray(f"shape must be a list of non-negative ints, got {shape!r:.100}")
    count = check_shape(tuple(shape), limits)
    wire_dtype = _WIRE_DTYPES[dtype]
    if count * wire_dtype.itemsize != buffer.nbytes:
        raise InvalidArray(f"a {dtype} array of shape {tuple(shape)} needs {count * wire_dtype.itemsize} bytes, "
                           f"its frame holds {buffer.nbytes}")
    array = np.frombuffer(buffer, dtype=wire_dtype).reshape(shape)
    array.flags.writeable = False  # it may be the sender's own memory (inproc) or a shared frame
    if dtype == "bool" and count and array.view(np.uint8).max() > 1:
        raise InvalidArray("bool array holds bytes other than 0 and 1")
    return array
