"""Checking one image file: can the pipeline use it, and what is in it.

Every file is decoded for real (a valid header says nothing about the pixels behind it).
Pillow reads the header first, so a decompression bomb is refused from its declared size
before a single pixel is decoded. Usable images are reduced to RGB however they were
stored (CMYK, grayscale, palette, alpha, 16-bit, EXIF-rotated, animated), and hashed:
SHA-256 of the bytes for exact duplicates, a 64-bit perceptual hash for near-duplicates.

Files TensorFlow cannot read as they are (``tf.io.decode_image`` knows JPEG, PNG, BMP and
GIF, but not WebP, nor CMYK colour, alpha, palettes or EXIF rotation as a person sees
them) get a lossless RGB PNG copy, which is what training then reads. Sources are only
ever read.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import imagehash
from PIL import Image, ImageOps, UnidentifiedImageError

# Rejection reasons, as written to rejected.csv and counted in metrics/data.json.
EMPTY = "empty_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"

# Stored as-is when Pillow reads them in one of these modes: tf.io.decode_image gives the
# same RGB pixels. Everything else is converted once, here, rather than at every epoch.
_TF_NATIVE_FORMATS = {"JPEG", "PNG", "BMP"}
_TF_NATIVE_MODES = {"RGB", "L"}
_EXIF_ORIENTATION = 0x0112


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
    converted: str = ""  # path of the RGB PNG copy, when one was needed


def check_image(
    path: str | Path,
    *,
    min_side: int,
    max_pixels: int,
    convert_to: str | Path | None = None,
) -> ImageCheck:
    """Decode ``path`` fully and report whether and how the pipeline can use it.

    ``convert_to`` is where an RGB PNG copy is written when TensorFlow could not read the
    file as a person sees it; without it no copy is made (``converted`` stays empty).
    """
    path = Path(path)
    name = str(path)
    data = path.read_bytes()
    if not data:
        return ImageCheck(name, EMPTY, "the file has zero bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit and raises at twice it; ours is the limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        return ImageCheck(name, TOO_LARGE, str(exc))
    except UnidentifiedImageError:
        return ImageCheck(name, NOT_AN_IMAGE, "not a format Pillow can read")
    except (OSError, ValueError, SyntaxError) as exc:
        return ImageCheck(name, CORRUPT, _one_line(exc))

    with image:
        width, height = image.size
        if width * height > max_pixels:
            return ImageCheck(
                name, TOO_LARGE, f"{width}x{height} px is over {max_pixels} px", width, height
            )
        if min(width, height) < min_side:
            return ImageCheck(
                name, TOO_SMALL, f"{width}x{height} px, below {min_side} px", width, height
            )
        image_format = image.format or ""
        try:
            # Animated GIF/WebP/PNG: the first frame is the picture. load() decodes every
            # pixel, which is what catches truncated and corrupt data.
            image.seek(0)
            image.load()
            rgb, native = _to_rgb(image, image_format)
        except OSError as exc:
            reason = TRUNCATED if "truncated" in str(exc).lower() else CORRUPT
            return ImageCheck(name, reason, _one_line(exc), width, height)
        except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return ImageCheck(name, CORRUPT, _one_line(exc), width, height)

    converted = ""
    if not native and convert_to is not None:
        convert_to = Path(convert_to)
        convert_to.parent.mkdir(parents=True, exist_ok=True)
        rgb.save(convert_to, format="PNG")
        converted = str(convert_to)
    return ImageCheck(
        name,
        width=rgb.width,
        height=rgb.height,
        sha256=hashlib.sha256(data).hexdigest(),
        phash=int(str(imagehash.phash(rgb)), 16),
        converted=converted,
    )


def _to_rgb(image: Image.Image, image_format: str) -> tuple[Image.Image, bool]:
    """The picture as RGB, and whether TensorFlow would read the file the same way."""
    rotated = image.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
    native = image_format in _TF_NATIVE_FORMATS and image.mode in _TF_NATIVE_MODES and not rotated
    if rotated:
        image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        # Palette images may hide transparency in the palette; RGBA makes it explicit.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        # Transparent pixels are undefined colour; flatten onto white as viewers show them.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background, False
    if image.mode.startswith("I"):
        # 16/32-bit integer images: scale into 8 bits rather than clip.
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image.convert("RGB"), native


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
