"""The one image reader: encoded bytes or a file in, the RGB pixels the model sees out.

Every consumer reads images through this module: prepare (which also checks and hashes
them), the image cache, ``train.input: files``, evaluate, explain, the served MLflow model
and ``predict``. So a photo means the same pixels in training and in serving, however it
was stored:

- only the formats below are opened (Pillow is never asked to guess among all its
  plugins, so an EPS file renamed ``.jpg`` cannot start Ghostscript);
- the pixel count is checked from the header, before a single pixel is decoded
  (decompression bombs);
- the first frame of an animation is the picture (one frame is decoded, not all);
- EXIF orientation is applied (phone photos), transparency is flattened onto white (as
  viewers show it), CMYK, palette, grey, 1-bit, 16-bit and float images become 8-bit RGB.

:func:`resize_for_model` is the one resize (bilinear, to the model's square, aspect ratio
not kept, as Keras' image loaders and the study did), in uint8, so that a lossless cache
of its output holds exactly what the served model computes from the same file.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from animalcam.errors import DataError

# Rejection reasons, as written to rejected.csv and counted in metrics/data.json.
EMPTY = "empty_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"

# What Animals-10 and phone cameras produce (JPEG includes the multi-picture MPO files of
# many phones). Anything else is "not an image" here, whatever Pillow could make of it.
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
# Pillow's own decompression-bomb limit (about 89 Mpx); prepare.max_pixels by default.
# Pillow refuses at twice it whatever we allow, so that is the ceiling of the setting.
DEFAULT_MAX_PIXELS = 89_478_485
PILLOW_MAX_PIXELS = 2 * DEFAULT_MAX_PIXELS
_WHITE = (255, 255, 255)
_TRANSPARENT_MODES = {"P", "PA", "LA", "La", "RGBA", "RGBa"}


class ImageReadError(DataError):
    """An image that cannot be used; ``reason`` is one of the rejection reasons above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_rgb(
    source: bytes | str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Encoded image bytes, or an image file, as ``(H, W, 3)`` uint8 RGB.

    ``max_pixels`` is checked from the header; None skips it (for files that prepare has
    already checked against ``prepare.max_pixels``).

    Raises :class:`ImageReadError` (reason ``empty_file``, ``not_an_image``,
    ``too_large``, ``truncated`` or ``corrupt``) for anything that is not a usable image.
    """
    return np.asarray(_read(source, max_pixels), dtype=np.uint8)


def resize_for_model(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` resized to ``size = (height, width)``: bilinear, uint8, aspect not kept."""
    height, width = size
    if rgb.shape[:2] == (height, width):
        return np.ascontiguousarray(rgb)
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)


def model_pixels(
    source: bytes | str | Path,
    size: tuple[int, int],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """What the model sees of ``source``: :func:`decode_rgb`, then :func:`resize_for_model`."""
    return resize_for_model(decode_rgb(source, max_pixels=max_pixels), size)


@dataclass(frozen=True)
class ImageCheck:
    """What checking one file found. ``reason`` is None for a usable image."""

    path: str
    reason: str | None = None
    detail: str = ""
    width: int = 0
    height: int = 0
    sha256: str = ""
    phash: int = 0  # 64-bit perceptual hash as an unsigned integer


def check_image(path: str | Path, *, min_side: int, max_pixels: int) -> ImageCheck:
    """Decode ``path`` fully, as every later stage will, and say whether it is usable.

    Usable images come back with their size (upright), the SHA-256 of the file's bytes
    (exact duplicates) and a perceptual hash of the pixels (near duplicates).
    """
    import imagehash  # prepare's alone: the served model does not need it

    name = str(path)
    try:
        data = Path(path).read_bytes()
        image = _read(data, max_pixels)
    except ImageReadError as exc:
        return ImageCheck(name, exc.reason, exc.detail)
    except OSError as exc:
        return ImageCheck(name, CORRUPT, f"cannot read the file: {_one_line(exc)}")
    width, height = image.size
    if min(width, height) < min_side:
        return ImageCheck(name, TOO_SMALL, f"{width}x{height} px, below {min_side} px")
    return ImageCheck(
        name,
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=int(str(imagehash.phash(image)), 16),
    )


def _read(source: bytes | str | Path, max_pixels: int | None) -> Image.Image:
    """The picture of ``source`` as an 8-bit RGB Pillow image (see the module docstring)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageReadError(EMPTY, "the image has zero bytes")
        stream = io.BytesIO(source)
    else:
        source = os.fspath(source)
        if os.path.getsize(source) == 0:
            raise ImageReadError(EMPTY, "the file has zero bytes")
        stream = source
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit and raises at twice it; ours is the limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(TOO_LARGE, _one_line(exc)) from None
    except UnidentifiedImageError:
        raise ImageReadError(
            NOT_AN_IMAGE, "not a JPEG, PNG, BMP, GIF, WebP or TIFF image"
        ) from None
    except Exception as exc:  # hostile bytes: any parser failure means corrupt
        raise ImageReadError(CORRUPT, _one_line(exc)) from None
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageReadError(TOO_LARGE, f"{width}x{height} px is over {max_pixels} px")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                # The first frame only: load() decodes the current frame, and decoding every
                # pixel is what catches truncated and corrupt data.
                image.seek(0)
                image.load()
                return _to_rgb(image)
        except OSError as exc:
            reason = TRUNCATED if "truncated" in str(exc).lower() else CORRUPT
            raise ImageReadError(reason, _one_line(exc)) from None
        except Exception as exc:  # malformed EXIF, palettes, frames: corrupt
            raise ImageReadError(CORRUPT, _one_line(exc)) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright, as 8-bit RGB, transparency flattened onto white."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16-bit data is scaled into 8 bits rather than clipped (I;16 always; 32-bit I when
        # its values need it); floats are taken as 0..255 values.
        values = np.asarray(image, dtype=np.float64)
        sixteen_bit = mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255)
        values = values / 256.0 if sixteen_bit else values
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _TRANSPARENT_MODES:
        # Palettes may hide transparency; RGBA makes it explicit. Transparent pixels have
        # undefined colour: flatten onto white, as viewers show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
