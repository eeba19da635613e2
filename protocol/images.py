"""Read an image file's format and pixel size from its header bytes, without decoding it.

The pixel limit must be enforced *before* the backend hands the bytes to a decoder: a 50 KB PNG can
declare 100000 x 100000 pixels and make Pillow allocate tens of gigabytes. Pillow is not available
inside Blender's Python and is not trusted here anyway, so the few header layouts are parsed by hand.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import InvalidImage, LimitExceeded
from .limits import Limits

SUPPORTED_FORMATS = ("png", "jpeg", "webp", "bmp", "tiff")

# JPEG start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI: markers without a length field
_JPEG_SOS = 0xDA  # start of scan: entropy-coded data follows, so a frame header must come before


@dataclass(frozen=True)
class ImageInfo:
    format: str  # one of SUPPORTED_FORMATS
    width: int
    height: int


def image_info(data: bytes) -> ImageInfo:
    """Identify `data`'s format and declared size; raise InvalidImage if either cannot be read."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        width, height = _png_size(data)
        fmt = "png"
    elif data.startswith(b"\xff\xd8"):
        width, height = _jpeg_size(data)
        fmt = "jpeg"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        width, height = _webp_size(data)
        fmt = "webp"
    elif data.startswith(b"BM"):
        width, height = _bmp_size(data)
        fmt = "bmp"
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        width, height = _tiff_size(data)
        fmt = "tiff"
    else:
        raise InvalidImage(f"unrecognised image format (first bytes {bytes(data[:8])!r}); "
                           f"supported formats: {', '.join(SUPPORTED_FORMATS)}")
    if width <= 0 or height <= 0:
        raise InvalidImage(f"{fmt} header declares an empty image ({width} x {height})")
    return ImageInfo(fmt, width, height)


def check_image(data: bytes, limits: Limits) -> ImageInfo:
    """Validate an image for submission: supported format, byte size and pixel count within limits."""
    if len(data) > limits.max_image_bytes:
        raise LimitExceeded("max_image_bytes", len(data), limits.max_image_bytes,
                            hint="re-encode the image smaller (PNG/JPEG/WebP) or downscale it")
    info = image_info(data)
    pixels = info.width * info.height
    if pixels > limits.max_image_pixels:
        raise LimitExceeded("max_image_pixels", pixels, limits.max_image_pixels,
                            hint=f"the image is {info.width} x {info.height}; downscale it "
                                 f"(the model works at about 1024 x 1024 anyway)")
    return info


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple[int, ...]:
    """struct.unpack_from that reports truncation as InvalidImage instead of struct.error."""
    if offset < 0 or offset + struct.calcsize(fmt) > len(data):
        raise InvalidImage(f"truncated {what} header: cannot read the image dimensions")
    return struct.unpack_from(fmt, data, offset)


def _png_size(data: bytes) -> tuple[int, int]:
    length, chunk, width, height = _unpack(">I4sII", data, 8, "PNG")
    if chunk != b"IHDR" or length != 13:
        raise InvalidImage("PNG does not start with an IHDR chunk")
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    while True:
        (prefix,) = _unpack(">B", data, pos, "JPEG")
        if prefix != 0xFF:
            raise InvalidImage(f"corrupt JPEG: expected a marker at byte {pos}")
        while True:  # any number of 0xFF fill bytes may precede the marker code
            pos += 1
            (marker,) = _unpack(">B", data, pos, "JPEG")
            if marker != 0xFF:
                break
        pos += 1
        if marker in _JPEG_NO_LENGTH:
            continue
        if marker == _JPEG_SOS:
            raise InvalidImage("JPEG has no frame header before its image data")
        (length,) = _unpack(">H", data, pos, "JPEG")
        if marker in _JPEG_SOF:
            _precision, height, width = _unpack(">BHH", data, pos + 2, "JPEG")
            if height == 0:
                raise InvalidImage("JPEG defines its height later in a DNL marker; re-save the file")
            return width, height
        if length < 2:
            raise InvalidImage(f"corrupt JPEG: segment length {length} at byte {pos}")
        pos += length


def _webp_size(data: bytes) -> tuple[int, int]:
    (chunk,) = _unpack("4s", data, 12, "WebP")
    if chunk == b"VP8 ":  # lossy: key frame header, start code, then 14-bit sizes
        start_code = _unpack("3s", data, 23, "WebP")[0]
        width, height = _unpack("<HH", data, 26, "WebP")
        if start_code != b"\x9d\x01\x2a":
            raise InvalidImage("WebP VP8 chunk lacks the key frame start code")
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature byte, then width-1 and height-1 in 14 bits each
        signature, bits = _unpack("<BI", data, 20, "WebP")
        if signature != 0x2F:
            raise InvalidImage("WebP VP8L chunk lacks its signature byte")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: canvas width-1 and height-1 as 24-bit little-endian ints
        w0, w1, w2, h0, h1, h2 = _unpack("<6B", data, 24, "WebP")
        return (w0 | w1 << 8 | w2 << 16) + 1, (h0 | h1 << 8 | h2 << 16) + 1
    raise InvalidImage(f"unknown WebP chunk {chunk!r}")


def _bmp_size(data: bytes) -> tuple[int, int]:
    (dib_size,) = _unpack("<I", data, 14, "BMP")
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
        return _unpack("<HH", data, 18, "BMP")
    if dib_size < 40:
        raise InvalidImage(f"unsupported BMP header size {dib_size}")
    width, height = _unpack("<ii", data, 18, "BMP")
    return width, abs(height)  # a negative height means rows are stored top-down


def _tiff_size(data: bytes) -> tuple[int, int]:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = _unpack(order + "I", data, 4, "TIFF")
    (count,) = _unpack(order + "H", data, ifd, "TIFF")
    size: dict[int, int] = {}
    for i in range(count):
        tag, kind, n = _unpack(order + "HHI", data, ifd + 2 + 12 * i, "TIFF")
        if tag in (256, 257) and n == 1 and kind in (3, 4):  # ImageWidth / ImageLength, SHORT or LONG
            (value,) = _unpack(order + ("H" if kind == 3 else "I"), data, ifd + 2 + 12 * i + 8, "TIFF")
            size[tag] = value
    if 256 not in size or 257 not in size:
        raise InvalidImage("TIFF first image directory lacks ImageWidth/ImageLength")
    return size[256], size[257]
