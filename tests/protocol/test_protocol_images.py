"""Image format and size sniffing, checked against Pillow on real files and against crafted headers."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from protocol import SUPPORTED_FORMATS, InvalidImage, LimitExceeded, Limits, check_image, image_info
from protocol_fakes import png_bytes

CASES = [  # (Pillow format, save options, mode)
    ("PNG", {}, "RGBA"),
    ("PNG", {}, "I;16"),
    ("JPEG", {}, "RGB"),
    ("JPEG", {"progressive": True, "quality": 80}, "L"),
    ("JPEG", {"exif": b"Exif\x00\x00" + bytes(100), "icc_profile": bytes(3000)}, "RGB"),
    ("WEBP", {"lossless": False}, "RGB"),
    ("WEBP", {"lossless": True}, "RGBA"),
    ("WEBP", {"lossless": False}, "RGBA"),  # lossy with alpha: VP8X container
    ("BMP", {}, "RGB"),
    ("BMP", {}, "P"),
    ("TIFF", {}, "RGB"),
    ("TIFF", {"compression": "tiff_lzw"}, "RGBA"),
]


def encoded(fmt: str, options: dict, mode: str, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, format=fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("fmt,options,mode", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("size", [(1, 1), (37, 5), (300, 1031)])
def test_dimensions_match_pillow(fmt, options, mode, size):
    data = encoded(fmt, options, mode, size)
    info = image_info(data)
    assert (info.format, info.width, info.height) == (fmt.lower(), *Image.open(io.BytesIO(data)).size)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_the_test_png_helper_makes_real_pngs(channels, mode):
    image = Image.open(io.BytesIO(png_bytes(13, 7, channels)))
    image.load()
    assert (image.size, image.mode) == ((13, 7), mode)
    assert image_info(png_bytes(13, 7, channels)) == image_info(encoded("PNG", {}, mode, (13, 7)))


def test_big_endian_tiff_and_os2_bmp_headers():
    ifd = struct.pack(">H", 2) + struct.pack(">HHIHH", 256, 3, 1, 640, 0) + struct.pack(">HHII", 257, 4, 1, 480)
    tiff = image_info(b"MM\x00*" + struct.pack(">I", 8) + ifd + bytes(4))
    assert (tiff.format, tiff.width, tiff.height) == ("tiff", 640, 480)
    bmp = b"BM" + bytes(12) + struct.pack("<IHH", 12, 123, 45) + bytes(8)
    assert (image_info(bmp).width, image_info(bmp).height) == (123, 45)
    top_down = b"BM" + bytes(12) + struct.pack("<Iii", 40, 64, -32) + bytes(40)
    assert (image_info(top_down).width, image_info(top_down).height) == (64, 32)


@pytest.mark.parametrize("fmt,options,mode", CASES[::2])
def test_every_truncation_gives_the_size_or_invalid_image(fmt, options, mode):
    """Deterministic fuzz: any prefix of a real file either still shows its size or is refused cleanly."""
    data = encoded(fmt, options, mode, (77, 33))
    for end in range(len(data)):
        try:
            info = image_info(data[:end])
        except InvalidImage:
            continue
        assert (info.width, info.height) == (77, 33)


def test_declared_size_is_limited_without_decoding():
    ihdr = struct.pack(">I4sIIBBBBB", 13, b"IHDR", 100_000, 100_000, 8, 6, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + ihdr + bytes(4)
    with pytest.raises(LimitExceeded) as info:
        check_image(bomb, Limits())
    assert info.value.limit == "max_image_pixels" and info.value.value == 10**10
    assert "100000 x 100000" in info.value.hint


def test_byte_limit_comes_first():
    data = encoded("PNG", {}, "RGB", (64, 64))
    with pytest.raises(LimitExceeded, match="max_image_bytes"):
        check_image(data, Limits(max_image_bytes=len(data) - 1))
    assert check_image(data, Limits(max_image_bytes=len(data))).format == "png"


@pytest.mark.parametrize("data,match", [
    (b"GIF89a" + bytes(20), "supported formats: " + ", ".join(SUPPORTED_FORMATS)),
    (b"", "unrecognised"),
    (b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", 0, 5), "empty image"),
    (b"\xff\xd8\xff\xda\x00\x02", "no frame header"),
    (b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10", "DNL"),
    (b"\xff\xd8\x00", "expected a marker"),
    (b"RIFF\x00\x00\x00\x00WEBPVP8Z", "unknown WebP chunk"),
    (b"BM" + bytes(12) + struct.pack("<I", 20) + bytes(20), "BMP header size"),
    (b"II*\x00" + struct.pack("<IH", 8, 0) + bytes(4), "ImageWidth"),
    (b"II*\x00" + struct.pack("<I", 0xFFFFFFF0), "truncated"),
])
def test_bad_images_are_refused_with_a_reason(data, match):
    with pytest.raises(InvalidImage, match=match):
        image_info(data)


MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"RIFF\x00\x00\x00\x00WEBP", b"BM", b"II*\x00", b"MM\x00*", b""]


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(MAGICS), st.binary(max_size=300))
def test_random_headers_never_raise_anything_but_invalid_image(magic, tail):
    try:
        info = image_info(magic + tail)
    except InvalidImage:
        return
    assert info.format in SUPPORTED_FORMATS and info.width > 0 and info.height > 0
