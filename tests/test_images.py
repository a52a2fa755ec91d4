import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image, save_image
from PIL import Image

from animalcam import images
from animalcam.images import check_image

LIMITS = {"min_side": 16, "max_pixels": 10_000_000}


def check(path: Path, tmp_path: Path, **overrides):
    return check_image(
        path, convert_to=tmp_path / "out" / (path.name + ".png"), **{**LIMITS, **overrides}
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("a.jpg", {"quality": 90}), ("a.png", {}), ("a.bmp", {})],
)
def test_rgb_files_tensorflow_reads_are_used_as_they_are(tmp_path, name, kwargs):
    path = save_image(tmp_path / name, seed=1, **kwargs)
    result = check(path, tmp_path)
    assert result.reason is None
    assert (result.width, result.height) == (48, 40)
    assert result.sha256 == digest(path)
    assert 0 <= result.phash < 2**64
    assert result.converted == ""
    assert not (tmp_path / "out").exists()


def test_grayscale_jpeg_is_used_as_it_is(tmp_path):
    path = tmp_path / "g.jpg"
    blob_image(2).convert("L").save(path)
    result = check(path, tmp_path)
    assert result.reason is None and result.converted == ""


def test_cmyk_jpeg_is_converted_to_rgb_png(tmp_path):
    path = tmp_path / "cmyk.jpg"
    blob_image(3).convert("CMYK").save(path)
    before = digest(path)
    result = check(path, tmp_path)
    assert result.reason is None
    converted = Image.open(result.converted)
    assert converted.format == "PNG" and converted.mode == "RGB"
    assert converted.size == (48, 40)
    # Colours survive the round trip (CMYK -> RGB is lossy only through JPEG).
    original = np.asarray(blob_image(3), dtype=float)
    assert np.abs(np.asarray(converted, dtype=float) - original).mean() < 20
    assert digest(path) == before  # the source is only read


def test_png_with_alpha_is_flattened_onto_white(tmp_path):
    rgba = blob_image(4).convert("RGBA")
    alpha = np.full((40, 48), 255, dtype=np.uint8)
    alpha[:, :24] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    path = tmp_path / "alpha.png"
    rgba.save(path)
    result = check(path, tmp_path)
    pixels = np.asarray(Image.open(result.converted))
    assert pixels.shape == (40, 48, 3)
    assert (pixels[:, :24] == 255).all()
    assert (pixels[:, 24:] == np.asarray(blob_image(4))[:, 24:]).all()


def test_palette_gif_takes_the_first_frame(tmp_path):
    frames = [blob_image(5).convert("P"), blob_image(6).convert("P")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    result = check(path, tmp_path)
    assert result.reason is None
    first = np.asarray(Image.open(result.converted), dtype=float)
    assert np.abs(first - np.asarray(frames[0].convert("RGB"), dtype=float)).mean() < 1


def test_webp_is_converted(tmp_path):
    path = save_image(tmp_path / "w.webp", seed=7)
    result = check(path, tmp_path)
    assert result.reason is None
    assert Image.open(result.converted).format == "PNG"


def test_exif_rotated_jpeg_is_converted_upright(tmp_path):
    image = blob_image(8, size=(60, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    result = check(path, tmp_path)
    assert (result.width, result.height) == (30, 60)
    assert Image.open(result.converted).size == (30, 60)


def test_converted_copy_is_skipped_without_a_target(tmp_path):
    path = save_image(tmp_path / "w.webp", seed=7)
    result = check_image(path, **LIMITS)
    assert result.reason is None and result.converted == ""


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", images.EMPTY),
        (b"this is not an image at all\n", images.NOT_AN_IMAGE),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, images.NOT_AN_IMAGE),
    ],
)
def test_unusable_bytes_are_rejected_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    result = check(path, tmp_path)
    assert result.reason == reason
    assert result.detail


def test_damaged_pixel_data_is_rejected_as_corrupt(tmp_path):
    buffer = io.BytesIO()
    blob_image(9, size=(100, 100)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.find(b"IDAT") + 20
    data[start : start + 40] = bytes(b ^ 0xFF for b in data[start : start + 40])
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data))
    result = check(path, tmp_path)
    assert result.reason == images.CORRUPT
    assert (result.width, result.height) == (100, 100)


def test_truncated_jpeg_is_rejected(tmp_path):
    buffer = io.BytesIO()
    blob_image(9, size=(200, 160)).save(buffer, format="JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert check(path, tmp_path).reason == images.TRUNCATED


def test_size_limits_are_checked_before_decoding(tmp_path):
    small = save_image(tmp_path / "small.png", seed=10, size=(15, 40))
    assert check(small, tmp_path).reason == images.TOO_SMALL
    big = save_image(tmp_path / "big.png", seed=11, size=(120, 100))
    result = check(big, tmp_path, max_pixels=100 * 100)
    assert result.reason == images.TOO_LARGE
    assert "120x100" in result.detail


def test_decompression_bomb_header_is_refused_without_decoding(tmp_path):
    # A real PNG header declaring 100k x 100k pixels (10 Gpx), far over Pillow's own limit.
    path = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(path)
    result = check(path, tmp_path, max_pixels=89_478_485)
    assert result.reason == images.TOO_LARGE


def test_resized_copy_has_a_close_perceptual_hash(tmp_path):
    a = check(save_image(tmp_path / "a.jpg", seed=12, size=(96, 80)), tmp_path)
    Image.open(tmp_path / "a.jpg").resize((64, 53)).save(tmp_path / "b.jpg", quality=60)
    b = check(tmp_path / "b.jpg", tmp_path)
    c = check(save_image(tmp_path / "c.jpg", seed=13, size=(96, 80)), tmp_path)
    assert (a.phash ^ b.phash).bit_count() <= 4
    assert (a.phash ^ c.phash).bit_count() > 10
