"""Input image decoding and the reference's preprocessing: matte, square crop around the object, premultiply.

`load_image` turns untrusted bytes (or a file) into an RGB or RGBA image, refusing anything odd with an
`ImageInputError` that names the problem and the fix. `preprocess_image` then follows the reference's
`Trellis2ImageTo3DPipeline.preprocess_image` step by step (spec §5), so the DINOv3 features see exactly the
pixels the official pipeline would have produced.

One deliberate difference: `load_image` applies the EXIF orientation tag, which the reference (a bare
`Image.open`) ignores. Phone photos store the sensor's pixel order and rely on that tag; every image viewer
shows them upright, so without it the user's object reaches the model lying on its side and comes back as a
sideways 3D model.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from backend.errors import InvalidInput
from backend.trellis2.pipeline_types import PREPROCESS

# Same default as the wire protocol's Limits.max_image_pixels; the server passes its own value.
DEFAULT_MAX_PIXELS = 8192 * 8192
MAX_SIDE = 1024  # reference: larger inputs are downscaled to this longest side before matting
FOREGROUND_ALPHA = 0.8 * 255  # reference: the crop box encloses the pixels whose alpha exceeds this

# A background remover takes an RGB image and returns it as RGBA with the predicted matte as alpha.
Remover = Callable[[Image.Image], Image.Image]

# Pillow decodes 16-bit grayscale PNG/TIFF into these modes; its own convert() clips them at 255 instead of
# scaling, which would turn almost every pixel white.
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageInputError(InvalidInput):
    """An input image we cannot use: `message` says what is wrong, `hint` what the user can do about it."""


def load_image(data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file (its bytes or its path) into a fully loaded RGB or RGBA image.

    Animated images give their first frame; the EXIF orientation is applied (see the module docstring).
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise ImageInputError(f"image file not found: {path}", "check the path")
        source, name = path, str(path)
        empty = path.stat().st_size == 0
    else:
        source, name = io.BytesIO(data), "image data"
        empty = len(data) == 0
    if empty:
        raise ImageInputError(f"{name} is empty (0 bytes)", "send the image file's full contents")

    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; we apply ours below, so the warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _check_size(image.size, max_pixels)
                image.seek(0)
                image.load()
                image = ImageOps.exif_transpose(image)
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageInputError(_too_many_pixels(f"{name} declares more pixels than Pillow's safety limit",
                                               max_pixels), _downscale_fix(max_pixels)) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageInputError(f"{name} is not an image in a format Pillow can read (or its header is damaged)",
                              "send a PNG, JPEG, WebP, BMP or TIFF file") from exc
    except Exception as exc:  # Pillow's decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise ImageInputError(f"{name} is corrupt or truncated ({type(exc).__name__}: {exc})",
                              "re-export the image from an image editor and send the complete file") from exc
    return to_rgb_or_rgba(image)


def to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """Bring any Pillow mode to RGB, or to RGBA when the image carries transparency of any kind."""
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"the image has no pixels ({image.width} x {image.height})",
                              "send an image with at least one pixel")
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit samples to 8 bit, rounding (65535 / 257 = 255). Mode "I" may hold wider values: clip them.
        samples = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.rint(samples / 257).astype(np.uint8))
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    target = "RGBA" if has_alpha else "RGB"
    try:
        return image if image.mode == target else image.convert(target)
    except ValueError as exc:
        raise ImageInputError(f"images of pixel mode {image.mode} are not supported ({exc})",
                              "save the image as 8-bit RGB or RGBA") from exc


def preprocess_image(image: Image.Image, remover: Remover | None) -> Image.Image:
    """The reference's preprocessing: returns the object cropped to a square, premultiplied onto black (RGB).

    An image with real transparency keeps its own alpha; any other goes through `remover`. With
    `remover=None` (background removal switched off) an opaque image is used whole, as if fully opaque.
    The result is not resized; the DINOv3 conditioner resizes it to 512 / 1024.
    """
    image = to_rgb_or_rgba(image)
    has_alpha = image.mode == "RGBA" and bool(np.any(np.asarray(image)[:, :, 3] != 255))
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)  # computed exactly as the reference does, truncation included
        size = (int(image.width * scale), int(image.height * scale))
        if min(size) == 0:
            raise ImageInputError(f"the image is {image.width} x {image.height} pixels: scaled to the model's "
                                  f"{MAX_SIDE}-pixel working size it would be {size[0]} x {size[1]}",
                                  "crop the image around the object (a roughly square image works best)")
        image = image.resize(size, Image.Resampling.LANCZOS)
    if not has_alpha:
        image = image.convert("RGB")
        image = image.convert("RGBA") if remover is None else _remove_background(image, remover)

    box = _foreground_crop_box(np.asarray(image)[:, :, 3])
    cropped = np.asarray(image.crop(box)).astype(np.float32) / 255  # out-of-image parts come back as zeros
    premultiplied = cropped[:, :, :3] * cropped[:, :, 3:4]
    return Image.fromarray((premultiplied * 255).astype(np.uint8))


def _remove_background(image: Image.Image, remover: Remover) -> Image.Image:
    matted = remover(image)
    if matted.mode != "RGBA" or matted.size != image.size:
        raise RuntimeError(f"background remover returned a {matted.mode} image of size {matted.size}; "
                           f"expected RGBA of size {image.size}")
    return matted


def _foreground_crop_box(alpha: np.ndarray) -> tuple[float, float, float, float]:
    """The reference's square crop box around the confident foreground (spec §5 step 4), for PIL's crop."""
    rows, cols = np.nonzero(alpha > FOREGROUND_ALPHA)
    if rows.size == 0:
        raise ImageInputError(
            f"no foreground found: no pixel's alpha exceeds {FOREGROUND_ALPHA:g} after background removal",
            "provide an image with an alpha channel or a clearer subject")
    x0, y0, x1, y1 = int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())
    size = max(x1 - x0, y1 - y0)  # inclusive indices, so one less than the pixel extent, as in the reference
    if size == 0:
        raise ImageInputError("the foreground is a single pixel", "provide an image with a larger subject")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = size // 2
    return cx - half, cy - half, cx + half, cy + half


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageInputError(_too_many_pixels(f"the image is {width} x {height} = {width * height} pixels",
                                               max_pixels), _downscale_fix(max_pixels))


def _too_many_pixels(what: str, max_pixels: int) -> str:
    return f"{what}, above the limit of {max_pixels} pixels (a decompression bomb, or simply too large)"


def _downscale_fix(max_pixels: int) -> str:
    return (f"downscale the image below {max_pixels} pixels (the model works at 1024 x 1024 anyway), "
            f"or raise the limit")


def prepared_image(image: Image.Image | bytes | str | Path, remove_background: bool, remover: Remover | None,
                   progress: Callable[[str, int, int], None]) -> Image.Image:
    """The pipelines' first stage, shared by image-to-3D and texturing: the image read (unless already one) and
    preprocessed, with the background removed when asked, reported as stage PREPROCESS."""
    progress(PREPROCESS.name, 0, 1)
    img = image if isinstance(image, Image.Image) else load_image(image)
    if remove_background:
        img = preprocess_image(img, remover)
    progress(PREPROCESS.name, 1, 1)
    return img

