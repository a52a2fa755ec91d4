import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image, save_image
from image_kinds import bmp_16bit, eps_bytes, kinds, png_declaring
from PIL import Image

from animalcam import images
from animalcam.images import ImageReadError, check_image, decode_rgb, model_pixels

LIMITS = {"min_side": 16, "max_pixels": 10_000_000}


def check(path: Path, tmp_path: Path, **overrides):
    return check_image(path, **{**LIMITS, **overrides})


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


KINDS = kinds()


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_every_kind_of_file_reads_as_a_person_sees_it(kind):
    pixels = decode_rgb(kind.data)
    assert pixels.dtype == np.uint8 and pixels.shape == kind.expected.shape
    assert np.abs(pixels.astype(float) - kind.expected).mean() <= kind.tolerance


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_a_file_and_its_bytes_read_the_same(tmp_path, kind):
    path = tmp_path / kind.name
    path.write_bytes(kind.data)
    assert np.array_equal(decode_rgb(path), decode_rgb(kind.data))
    assert path.read_bytes() == kind.data  # the source is only read


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_check_image_accepts_every_kind_with_its_upright_size(tmp_path, kind):
    path = tmp_path / kind.name
    path.write_bytes(kind.data)
    result = check(path, tmp_path)
    assert result.reason is None
    assert (result.height, result.width) == kind.expected.shape[:2]
    assert result.sha256 == hashlib.sha256(kind.data).hexdigest()
    assert 0 <= result.phash < 2**64


def test_a_16_bit_bmp_that_tensorflow_refuses_is_read():
    data, expected = bmp_16bit()
    assert np.array_equal(decode_rgb(data), expected)


def test_model_pixels_are_the_bilinear_resize_of_the_upright_picture():
    kind = next(k for k in KINDS if k.name == "exif6.jpg")
    pixels = model_pixels(kind.data, (20, 30))
    assert pixels.shape == (20, 30, 3) and pixels.dtype == np.uint8
    expected = images.resize_for_model(decode_rgb(kind.data), (20, 30))
    assert np.array_equal(pixels, expected)
    # The resize keeps the picture: close to Pillow's bilinear resize of the expectation.
    reference = np.asarray(
        Image.fromarray(kind.expected).resize((30, 20), Image.Resampling.BILINEAR), dtype=float
    )
    assert np.abs(pixels - reference).mean() < 12


def test_a_declared_bomb_is_refused_from_the_header_before_decoding(monkeypatch):
    # Decoding would need gigabytes; the header alone must decide, so load() never runs.
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(ImageReadError) as error:
        decode_rgb(png_declaring(12_000, 12_000))
    assert error.value.reason == images.TOO_LARGE
    assert "12000x12000" in str(error.value)


def test_the_pixel_limit_is_the_callers(tmp_path):
    data = png_declaring(3_000, 2_000)
    with pytest.raises(ImageReadError, match="3000x2000 px is over 5000000 px"):
        decode_rgb(data, max_pixels=5_000_000)


def test_an_eps_file_named_jpg_is_not_an_image_and_never_reaches_ghostscript(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(eps_bytes())
    # Ghostscript would show up as a child process; Pillow is not even asked to try EPS.
    code = (
        "import sys, subprocess\n"
        "calls = []\n"
        "real = subprocess.Popen.__init__\n"
        "def spy(self, *a, **k):\n"
        "    calls.append(a)\n"
        "    return real(self, *a, **k)\n"
        "subprocess.Popen.__init__ = spy\n"
        "from animalcam.images import check_image\n"
        f"result = check_image({str(path)!r}, min_side=1, max_pixels=10**8)\n"
        "print(result.reason, len(calls))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == [images.NOT_AN_IMAGE, "0"]


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
