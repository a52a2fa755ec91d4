"""One picture stored in every way a user's files store it, with what a person sees.

Each kind is ``(file name, encoded bytes, expected RGB)``: the expected pixels are what
a viewer shows (upright, transparency on white, 8-bit RGB), computed here independently
of the code under test. Lossy kinds (JPEG, WebP) carry a tolerance.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

WHITE = 255


@dataclass(frozen=True)
class Kind:
    name: str  # file name, suffix included
    data: bytes
    expected: np.ndarray  # (H, W, 3) uint8, what a person sees
    tolerance: float  # mean absolute difference allowed (lossy formats)


def picture(width: int = 48, height: int = 40, seed: int = 0) -> np.ndarray:
    """Smooth random colours: survives JPEG with small errors, unique per seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def exif_rotated(rgb: np.ndarray, orientation: int) -> tuple[bytes, np.ndarray]:
    """A JPEG whose stored pixels must be turned by EXIF ``orientation`` to look like
    ``rgb``; returns its bytes and ``rgb`` (the upright picture)."""
    # How to store the picture so that applying the orientation gives it back: the
    # inverse of each EXIF transform.
    inverse = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.transpose(a, (1, 0, 2)),
        6: lambda a: np.rot90(a, 1),
        7: lambda a: np.rot90(np.transpose(a, (1, 0, 2)), 2),
        8: lambda a: np.rot90(a, -1),
    }[orientation]
    stored = Image.fromarray(np.ascontiguousarray(inverse(rgb)))
    exif = stored.getexif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif), rgb


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.round(rgb * a + WHITE * (1 - a)).astype(np.uint8)


def kinds(width: int = 48, height: int = 40) -> list[Kind]:
    rgb = picture(width, height)
    image = Image.fromarray(rgb)
    grey = np.asarray(image.convert("L"))
    alpha = np.full((height, width), 255, dtype=np.uint8)
    alpha[:, : width // 2] = 0
    alpha[: height // 4] = 128
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")

    out = [
        Kind("rgb.png", encode(image, "PNG"), rgb, 0),
        Kind("rgb.bmp", encode(image, "BMP"), rgb, 0),
        Kind("rgb.jpg", encode(image, "JPEG", quality=95), rgb, 3),
        Kind("rgb.webp", encode(image, "WEBP", lossless=True), rgb, 0),
        Kind("rgb.tiff", encode(image, "TIFF"), rgb, 0),
        Kind("grey.png", encode(image.convert("L"), "PNG"), np.dstack([grey] * 3), 0),
        Kind("alpha.png", encode(rgba, "PNG"), on_white(rgb, alpha), 0),
        Kind(
            "grey_alpha.png",
            encode(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"),
            on_white(np.dstack([grey] * 3), alpha),
            0,
        ),
        Kind("cmyk.jpg", encode(image.convert("CMYK"), "JPEG", quality=95), rgb, 6),
    ]
    # Palette with a transparent entry: index 0 is see-through.
    palette = image.quantize(64)
    indices = np.asarray(palette).copy()
    indices[:, : width // 3] = 0
    palette_image = Image.fromarray(indices, "P")
    palette_image.putpalette(palette.getpalette())
    shown = np.asarray(palette_image.convert("RGB")).copy()
    shown[indices == 0] = WHITE
    out.append(
        Kind("palette.png", encode(palette_image, "PNG", transparency=0), shown, 0),
    )
    # Animated GIF: the first frame is the picture.
    first = image.quantize(256)
    second = Image.fromarray(picture(width, height, seed=9)).quantize(256)
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=100)
    out.append(Kind("animated.gif", gif, np.asarray(first.convert("RGB")), 0))
    # Animated WebP likewise.
    webp = encode(
        image,
        "WEBP",
        lossless=True,
        save_all=True,
        append_images=[Image.fromarray(picture(width, height, 9))],
    )
    out.append(Kind("animated.webp", webp, rgb, 0))
    # 16-bit grey: scaled into 8 bits (v / 256), not clipped.
    sixteen = grey.astype(np.uint16) * 257
    scaled = np.clip(np.round(sixteen / 256), 0, 255).astype(np.uint8)
    out.append(
        Kind("grey16.png", encode(Image.fromarray(sixteen), "PNG"), np.dstack([scaled] * 3), 0)
    )
    # 1-bit black and white.
    bits = np.asarray(image.convert("1"))
    out.append(
        Kind(
            "bw.png",
            encode(image.convert("1"), "PNG"),
            np.dstack([bits.astype(np.uint8) * 255] * 3),
            0,
        )
    )
    for orientation in range(2, 9):
        data, upright = exif_rotated(rgb, orientation)
        out.append(Kind(f"exif{orientation}.jpg", data, upright, 3))
    return out


def bmp_16bit(width: int = 48, height: int = 40) -> tuple[bytes, np.ndarray]:
    """A 16 bits-per-pixel BMP (X1R5G5B5, BI_RGB), which TensorFlow's decoder refuses;
    returns its bytes and the RGB a viewer shows (5-bit channels scaled to 8 bits)."""
    rgb = picture(width, height, seed=3)
    five = (rgb.astype(np.uint16) >> 3).astype(np.uint16)
    words = (five[..., 0] << 10) | (five[..., 1] << 5) | five[..., 2]
    row_bytes = (width * 2 + 3) & ~3
    rows = bytearray()
    for y in range(height - 1, -1, -1):  # bottom-up
        line = words[y].astype("<u2").tobytes()
        rows += line + b"\0" * (row_bytes - len(line))
    header_size, info_size = 14, 40
    offset = header_size + info_size
    file_header = b"BM" + (offset + len(rows)).to_bytes(4, "little") + b"\0\0\0\0"
    file_header += offset.to_bytes(4, "little")
    info = info_size.to_bytes(4, "little") + width.to_bytes(4, "little", signed=True)
    info += height.to_bytes(4, "little", signed=True) + (1).to_bytes(2, "little")
    info += (16).to_bytes(2, "little") + (0).to_bytes(4, "little")  # BI_RGB
    info += len(rows).to_bytes(4, "little") + b"\0" * 16
    expected = Image.open(io.BytesIO(file_header + info + bytes(rows))).convert("RGB")
    return file_header + info + bytes(rows), np.asarray(expected)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels (a decompression bomb:
    the file is a few hundred bytes; decoding it would take gigabytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    # A few rows of zeros, compressed: the rest of the image is simply missing.
    data = zlib.compress(b"\0" * (1 + 3 * min(width, 1024)) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def eps_bytes() -> bytes:
    """A minimal Encapsulated PostScript file (Pillow would hand it to Ghostscript)."""
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 40\n"
        b"newpath 0 0 moveto 40 40 lineto stroke\nshowpage\n%%EOF\n"
    )
