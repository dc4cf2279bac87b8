"""Uploaded images: every kind of file a room of students may upload is converted or refused in one sentence.

Every file is generated here; nothing binary is committed. The app side (a refused upload leaves the
page running with the previous image) is driven in a real browser in test_browser.py.
"""

import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from meansparse_core.data import load_image

CIFAR = (3, 32, 32)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written chunk by chunk, for what PIL will not write (48-bit colour, 400-megapixel bombs).

    ``rows`` is the raw scanline data without filter bytes; None means all zeros, streamed through
    zlib so that a bomb costs a few megabytes to build, not gigabytes.
    """
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    row_bytes = (width * channels * bit_depth + 7) // 8
    compressor = zlib.compressobj(9)
    if rows is None:
        zero_row = bytes(1 + row_bytes)
        data = b"".join(compressor.compress(zero_row) for _ in range(height))
    else:
        data = compressor.compress(b"".join(b"\0" + rows[i * row_bytes:(i + 1) * row_bytes] for i in range(height)))
    data += compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def is_model_input(tensor: torch.Tensor, size=CIFAR) -> bool:
    return tuple(tensor.shape) == size and bool(torch.isfinite(tensor).all()) and 0 <= tensor.min() <= tensor.max() <= 1


@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP"), ("L", "PNG"),
                                       ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"),
                                       ("1", "PNG"), ("LA", "PNG"), ("RGB", "GIF"), ("RGB", "BMP"), ("RGB", "TIFF")])
def test_images_of_any_mode_and_format_fit_the_model(mode, fmt):
    image = Image.new("RGB", (120, 80), (200, 100, 50)).convert(mode)
    for size in [CIFAR, (1, 8, 8)]:
        assert is_model_input(load_image(encoded(image, fmt), size), size)


def test_colours_survive_cmyk_palette_and_16_bit_files():
    orange = torch.tensor([200, 100, 50]) / 255
    for data in [encoded(Image.new("RGB", (40, 40), (200, 100, 50)).convert("CMYK"), "JPEG", quality=100),
                 encoded(Image.new("RGB", (40, 40), (200, 100, 50)).convert("P"), "PNG"),
                 png(4, 4, 16, 2, bytes([200, 0, 100, 0, 50, 0] * 16))]:  # 48-bit colour
        pixel = load_image(data, CIFAR)[:, 16, 16]
        assert torch.allclose(pixel, orange, atol=0.03), pixel


def test_16_bit_grey_keeps_its_tones():
    # A 16-bit grey ramp must stay a ramp, not saturate at white above 255 (as a naive conversion does).
    ramp = b"".join(struct.pack(">H", v) for v in [0, 16384, 32768, 65535])
    row = load_image(png(4, 1, 16, 0, ramp), (1, 1, 4))[0, 0]
    assert torch.allclose(row, torch.tensor([0.0, 0.25, 0.5, 1.0]), atol=0.01), row


def test_tiny_images_are_scaled_up():
    assert is_model_input(load_image(encoded(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), CIFAR))
    assert is_model_input(load_image(encoded(Image.new("RGB", (1, 500), (10, 20, 30)), "PNG"), CIFAR))


def test_transparent_pixels_become_white_and_exif_rotation_is_applied():
    assert load_image(encoded(Image.new("RGBA", (10, 10), (0, 0, 0, 0)), "PNG"), (3, 8, 8)).min() == 1.0
    palette = Image.new("P", (10, 10), 0)
    palette.info["transparency"] = 0
    assert load_image(encoded(palette, "PNG"), (3, 8, 8)).min() == 1.0
    tall = Image.new("RGB", (20, 40), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 0, 20, 20))  # white top half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    shown = load_image(encoded(tall, "JPEG", exif=exif), (1, 20, 40))
    assert shown[0, :, 20:].mean() > 0.9 and shown[0, :, :20].mean() < 0.1  # white half now on the right


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animations_give_their_first_frame(fmt):
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    data = encoded(red, fmt, save_all=True, append_images=[blue], duration=100, loop=0, **(
        {"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).n_frames == 2
    pixel = load_image(data, CIFAR)[:, 16, 16]
    assert pixel[0] > 0.9 and pixel[2] < 0.1


@pytest.mark.parametrize("name, data", [
    ("empty", b""),
    ("text", b"hello, this is not an image"),
    ("pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
    ("random bytes", bytes(range(256)) * 8),
])
def test_files_that_are_not_images_are_refused_in_one_sentence(name, data):
    with pytest.raises(ValueError, match="could not be read as an image; upload a PNG, JPEG or WebP") as refused:
        load_image(data, CIFAR)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("fmt, keep", [("PNG", 0.5), ("JPEG", 0.5), ("PNG", 60 / 1000), ("WEBP", 0.5)])
def test_truncated_files_are_refused_in_one_sentence(fmt, keep):
    noise = Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 256 for i in range(64 * 64 * 3)))
    data = encoded(noise, fmt)
    with pytest.raises(ValueError, match="(damaged or incomplete|could not be read as an image)") as refused:
        load_image(data[:int(len(data) * keep)], CIFAR)
    assert "\n" not in str(refused.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the point of the test
def test_decompression_bombs_are_refused_before_decoding():
    bomb = png(10_000, 10_000, 1, 0)  # 100 megapixels (300 MB as RGB) in about 13 kB
    assert len(bomb) < 1_000_000
    with pytest.raises(ValueError, match="10000x10000 pixels; upload one under 40 megapixels"):
        load_image(bomb, CIFAR)
    # Beyond twice Pillow's own limit, Image.open itself refuses; that becomes the same kind of sentence.
    with pytest.raises(ValueError, match="too many pixels to open safely; upload one under 40 megapixels"):
        load_image(png(20_000, 20_000, 1, 0), CIFAR)
