from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.imaging import (
    ImageLimits,
    ImageTooLargeError,
    UnreadableImageError,
    UnsupportedImageError,
    UnusableImageError,
    decode_image,
)
from tests.conftest import encode, png_bomb, rgb_image

LIMITS = ImageLimits(max_bytes=8 * 1024 * 1024, max_pixels=50_000_000)


def pixels(data: bytes) -> np.ndarray:
    decoded = decode_image(data, LIMITS)
    assert decoded.picture.mode == "RGB"
    return np.asarray(decoded.picture)


@pytest.mark.parametrize(
    ("fmt", "name"), [("PNG", "PNG"), ("JPEG", "JPEG"), ("TIFF", "TIFF"), ("BMP", "BMP"), ("WEBP", "WEBP")]
)
def test_accepted_formats_decode_to_rgb_at_their_size(fmt: str, name: str) -> None:
    decoded = decode_image(encode(rgb_image(120, 80), fmt), LIMITS)
    assert (decoded.width, decoded.height, decoded.source_format) == (120, 80, name)
    assert decoded.picture.mode == "RGB"


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (40, 1)), mode="L")
    result = pixels(encode(gray))
    assert (result[..., 0] == result[..., 1]).all()
    assert (result[..., 1] == result[..., 2]).all()
    assert result[0, 10, 0] == 40


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_is_stretched_over_its_real_range_not_truncated(fmt: str) -> None:
    # A 12-bit radiograph in 16-bit words: values 1000..4000. Truncating to the high byte gives 3..15.
    ramp = np.linspace(1000, 4000, 64).astype(np.uint16)
    picture = Image.fromarray(np.tile(ramp, (48, 1)))
    assert picture.mode.startswith("I;16")
    result = pixels(encode(picture, fmt))[..., 0]
    assert result.min() == 0
    assert result.max() == 255
    middle = int(np.argmin(np.abs(ramp.astype(int) - 2500)))
    assert abs(int(result[0, middle]) - round((int(ramp[middle]) - 1000) / 3000 * 255)) <= 1


def test_transparent_areas_become_black() -> None:
    rgba = Image.new("RGBA", (40, 40), (255, 255, 255, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 20, 40))
    result = pixels(encode(rgba))
    assert tuple(result[5, 5]) == (200, 10, 10)
    assert tuple(result[5, 30]) == (0, 0, 0)


def test_palette_with_transparency() -> None:
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 250, 250, 250] + [0] * 762)
    palette.paste(1, (0, 0, 40, 20))
    data = encode(palette, transparency=1)
    result = pixels(data)
    assert tuple(result[30, 5]) == (0, 0, 0)
    assert tuple(result[5, 5]) == (0, 0, 0)  # the transparent colour, composited on black


def test_exif_orientation_is_applied() -> None:
    picture = rgb_image(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(picture, "JPEG", exif=exif.tobytes()), LIMITS)
    assert (decoded.width, decoded.height) == (40, 60)


def test_text_is_not_an_image() -> None:
    with pytest.raises(UnreadableImageError):
        decode_image(b"Patient: Jane Doe\nThis is a text file, not an image.\n", LIMITS)


def test_empty_and_corrupt_bytes() -> None:
    with pytest.raises(UnreadableImageError):
        decode_image(b"", LIMITS)
    png = encode(rgb_image(64, 64))
    with pytest.raises(UnreadableImageError):
        decode_image(png[: len(png) // 2], LIMITS)
    with pytest.raises(UnreadableImageError):
        decode_image(png[:8] + b"\x00" * 64, LIMITS)


def test_formats_outside_the_list_are_unsupported() -> None:
    gif = encode(Image.new("P", (64, 64)), "GIF")
    with pytest.raises(UnsupportedImageError):
        decode_image(gif, LIMITS)


def test_too_small_and_extreme_aspect_ratios_are_refused() -> None:
    with pytest.raises(UnusableImageError, match="1x1"):
        decode_image(encode(Image.new("RGB", (1, 1))), LIMITS)
    with pytest.raises(UnusableImageError, match="aspect ratio"):
        decode_image(encode(Image.new("L", (32 * 201, 32))), LIMITS)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = png_bomb(12_000, 12_000)  # 144 million pixels from a few hundred kilobytes
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageTooLargeError, match="12000x12000"):
        decode_image(bomb, LIMITS)


def test_files_over_the_byte_limit_are_refused() -> None:
    with pytest.raises(ImageTooLargeError):
        decode_image(encode(rgb_image(64, 64)), ImageLimits(max_bytes=100, max_pixels=10**6))


@pytest.mark.parametrize("cut", [100, 300, 1000])
def test_a_truncated_png_is_reported_as_truncated_not_as_an_unknown_format(cut: int) -> None:
    with pytest.raises(UnreadableImageError, match="the PNG image data is corrupt or truncated"):
        decode_image(encode(rgb_image(96, 64))[:cut], LIMITS)


def test_a_truncated_jpeg_is_reported_as_corrupt_or_truncated() -> None:
    jpeg = encode(rgb_image(96, 64), "JPEG")
    with pytest.raises(UnreadableImageError, match="the JPEG image data is corrupt or truncated"):
        decode_image(jpeg[: len(jpeg) // 2], LIMITS)
