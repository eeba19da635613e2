"""Image decoding, the reference's preprocessing arithmetic (spec §5) and rembg background removal."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from backend.trellis2.background import (BackgroundModelError, RembgRemover, write_tiny_background_model)
from backend.trellis2.preprocess import ImageInputError, load_image, preprocess_image


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels but carries almost no data: a cheap decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + png_chunk(b"IEND", b""))


def never_called(image: Image.Image) -> Image.Image:
    raise AssertionError("the background remover must not run on an image with its own transparency")


class FullMatte:
    """A remover that records its input and declares every pixel foreground."""

    def __init__(self):
        self.inputs: list[Image.Image] = []

    def __call__(self, image: Image.Image) -> Image.Image:
        self.inputs.append(image)
        rgba = image.convert("RGBA")
        rgba.putalpha(255)
        return rgba


@pytest.fixture(scope="module")
def tiny_remover(tmp_path_factory) -> RembgRemover:
    model = write_tiny_background_model(tmp_path_factory.mktemp("rembg") / "tiny.onnx")
    return RembgRemover(model_path=model, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------------------
# Hostile and odd inputs


def noise_png(seed: int = 0) -> bytes:
    return encode(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)))


def corrupted_png() -> bytes:
    data = bytearray(noise_png())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # zeros over the compressed pixel data
    return bytes(data)


@pytest.mark.parametrize("data, problem", [
    (b"", "empty"),
    (b"hello, this is a text file\n" * 10, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not an image"),  # a PNG signature, then garbage
    (corrupted_png(), "corrupt"),
])
def test_unusable_bytes_are_rejected_with_a_fix(data, problem):
    with pytest.raises(ImageInputError) as info:
        load_image(data)
    assert problem in info.value.message
    assert info.value.hint and "(" in str(info.value)


def test_truncated_png_is_rejected():
    data = noise_png()
    with pytest.raises(ImageInputError, match="truncated"):
        load_image(data[: len(data) // 2])


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ImageInputError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageInputError, match="empty"):
        load_image(str(tmp_path / "empty.png"))


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (9000, 9000)])
def test_decompression_bombs_are_rejected_from_the_header(width, height):
    # 10^10 pixels trips Pillow's own error; 81 M pixels passes Pillow but not our default 8192^2 limit.
    with pytest.raises(ImageInputError) as info:
        load_image(png_header_only(width, height))
    assert str(8192 * 8192) in info.value.message and "downscale" in info.value.hint


def test_pixel_limit_is_configurable():
    data = encode(Image.new("RGB", (100, 60)))
    assert load_image(data, max_pixels=6000).size == (100, 60)
    with pytest.raises(ImageInputError, match="5999 pixels"):
        load_image(data, max_pixels=5999)


def test_zero_size_image_is_rejected():
    with pytest.raises(ImageInputError, match="no pixels"):
        preprocess_image(Image.new("RGB", (0, 7)), None)


@pytest.mark.parametrize("size", [(8192, 1), (1, 4096), (4096, 3)])
def test_an_image_too_thin_for_the_working_size_is_refused_clearly(size):
    with pytest.raises(ImageInputError) as info:
        preprocess_image(Image.new("RGB", size, (200, 10, 10)), None)
    assert f"{size[0]} x {size[1]} pixels" in info.value.message and "crop" in info.value.hint
    assert info.value.code == "invalid_image"


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    samples = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0, 257, ..., 65535
    image = load_image(encode(Image.fromarray(samples)))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[:, :, 1], np.arange(256).reshape(16, 16))


def test_palette_with_transparency_becomes_rgba():
    palette_image = Image.new("P", (8, 8), 1)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.paste(0, (0, 0, 4, 8))
    image = load_image(encode(palette_image, transparency=0))
    assert image.mode == "RGBA"
    pixels = np.asarray(image)
    assert (pixels[:, :4, 3] == 0).all() and (pixels[:, 4:, 3] == 255).all()
    assert (pixels[:, 4:, :3] == (255, 0, 0)).all()


def test_grayscale_modes():
    gray = load_image(encode(Image.new("L", (4, 4), 77)))
    assert gray.mode == "RGB" and (np.asarray(gray) == 77).all()
    gray_alpha = load_image(encode(Image.new("LA", (4, 4), (77, 10))))
    assert gray_alpha.mode == "RGBA" and (np.asarray(gray_alpha) == (77, 77, 77, 10)).all()


def test_cmyk_jpeg_becomes_rgb():
    image = load_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert image.mode == "RGB"
    red, green, blue = np.asarray(image, dtype=int)[8, 8]
    assert red > 230 and green < 25 and blue < 25


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = load_image(encode(stored, "JPEG", exif=exif, quality=95))
    assert image.size == (20, 40)
    top_right, top_left = np.asarray(image, dtype=int)[4, 15], np.asarray(image, dtype=int)[4, 4]
    assert top_right[0] > 200 and top_right[2] < 60  # red went to the displayed top-right
    assert top_left[2] > 200 and top_left[0] < 60


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("P", (8, 8), 0), Image.new("P", (8, 8), 1)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    image = load_image(data)
    assert image.mode == "RGB" and (np.asarray(image) == (255, 0, 0)).all()


# ----------------------------------------------------------------------------------------------------------
# The reference's preprocessing arithmetic


def test_crop_box_matches_the_reference_arithmetic_pixel_exactly():
    rng = np.random.default_rng(1)
    rgba = np.zeros((80, 100, 4), dtype=np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (80, 100, 3))
    rgba[2:12, 10:50, 3] = 255  # confident foreground: rows 2..11, columns 10..49
    rgba[5, 30, 3] = 100  # a soft pixel inside the crop: premultiplied, not part of the box computation
    rgba[70, 90, 3] = 204  # exactly 0.8 * 255: not foreground (strict >), else the box would grow
    result = preprocess_image(Image.fromarray(rgba), never_called)

    # By hand (spec §5): x0, y0, x1, y1 = 10, 2, 49, 11; centre (29.5, 6.5); size = max(39, 9) = 39; half 19;
    # box (10.5, -12.5, 48.5, 25.5), rounded half-to-even by PIL's crop: (10, -12, 48, 26) -> 38 x 38,
    # with rows -12..-1 outside the image and filled with zeros.
    expected = np.zeros((38, 38, 3), dtype=np.uint8)
    source = rgba[0:26, 10:48].astype(np.int64)
    expected[12:] = source[..., :3] * source[..., 3:] // 255
    assert result.mode == "RGB" and result.size == (38, 38)
    np.testing.assert_array_equal(np.asarray(result), expected)


@pytest.mark.parametrize("value, alpha, premultiplied", [
    (255, 255, 255), (200, 0, 0), (255, 128, 128), (200, 128, 100), (10, 250, 9), (100, 128, 50),
])
def test_premultiplication_truncates(value, alpha, premultiplied):
    rgba = np.zeros((9, 9, 4), dtype=np.uint8)
    rgba[..., :3] = value
    rgba[1:8, 1:8, 3] = 255
    rgba[4, 4, 3] = alpha  # the centre pixel; the crop (1, 1, 7, 7) keeps it at (3, 3)
    result = np.asarray(preprocess_image(Image.fromarray(rgba), never_called))
    assert result.shape == (6, 6, 3)
    assert (result[3, 3] == premultiplied).all() and (result[0, 0] == value).all()


def test_opaque_rgba_goes_through_the_remover():
    rgba = np.full((20, 30, 4), 255, dtype=np.uint8)
    remover = FullMatte()
    result = preprocess_image(Image.fromarray(rgba), remover)
    assert len(remover.inputs) == 1 and remover.inputs[0].mode == "RGB"
    # Whole image is foreground: box (0.5, -4.5, 28.5, 23.5) -> (0, -4, 28, 24), as the reference crops it.
    assert result.size == (28, 28)


def test_no_remover_uses_an_opaque_image_whole():
    result = np.asarray(preprocess_image(Image.new("RGB", (30, 20), (9, 8, 7)), None))
    assert result.shape == (28, 28, 3)
    assert (result[:4] == 0).all() and (result[4:24] == (9, 8, 7)).all() and (result[24:] == 0).all()


def test_large_images_are_downscaled_with_lanczos_before_matting():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (1001, 1500, 3), dtype=np.uint8))
    remover = FullMatte()
    preprocess_image(image, remover)
    # scale = 1024 / 1500; int(1500 * scale) = 1024, int(1001 * scale) = int(683.35) = 683
    (seen,) = remover.inputs
    assert seen.size == (1024, 683)
    expected = image.resize((1024, 683), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(seen), np.asarray(expected))


def test_image_without_foreground_is_a_clear_error():
    with pytest.raises(ImageInputError) as info:
        preprocess_image(Image.new("RGBA", (16, 16), (255, 0, 0, 204)), never_called)
    assert "no foreground found" in info.value.message
    assert "alpha channel" in info.value.hint


def test_single_pixel_foreground_is_a_clear_error():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[3, 3, 3] = 255
    with pytest.raises(ImageInputError, match="single pixel"):
        preprocess_image(Image.fromarray(rgba), never_called)


# ----------------------------------------------------------------------------------------------------------
# Background removal through rembg


def test_tiny_onnx_model_runs_through_rembg(tiny_remover):
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    matted = tiny_remover(image)
    assert matted.mode == "RGBA" and matted.size == image.size
    pixels = np.asarray(matted)
    np.testing.assert_array_equal(pixels[..., :3], np.asarray(image))
    assert pixels[..., 3].min() < pixels[..., 3].max()  # a real matte, not a constant
    np.testing.assert_array_equal(np.asarray(tiny_remover(image)), pixels)  # deterministic

    result = preprocess_image(image, tiny_remover)
    assert result.mode == "RGB" and result.width == result.height > 0


def test_missing_named_model_offline_names_model_cache_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # nothing listens there: no network, instantly
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(BackgroundModelError) as info:
        RembgRemover("birefnet-general")
    message = str(info.value)
    assert "'birefnet-general'" in message and "U2NET_HOME" in message and "model_path" in message
    assert str(tmp_path / "models" / "birefnet-general" / "birefnet-general.onnx") in message


def test_bad_model_files_and_names(tmp_path):
    with pytest.raises(BackgroundModelError, match="not found"):
        RembgRemover(model_path=tmp_path / "absent.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(BackgroundModelError, match="could not load"):
        RembgRemover(model_path=tmp_path / "garbage.onnx")
    with pytest.raises(BackgroundModelError, match="birefnet-general"):
        RembgRemover("no-such-session")
    with pytest.raises(BackgroundModelError, match="model_path"):
        RembgRemover("u2net_custom")
