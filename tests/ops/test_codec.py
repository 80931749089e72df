"""Decoding hostile and unusual inputs: correct pixels or a clear OpInputError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ops.base import OpInputError
from ops.codec import decode_image, encode_image
from ops.metrics import psnr


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w=64, h=48) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float64)
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None]
    return np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), np.full((h, w), 90.0)], axis=2).astype(np.uint8)


def test_exif_orientation_is_applied():
    arr = _gradient(64, 48)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: viewers rotate 90 degrees clockwise
    decoded = decode_image(_save(img, "PNG", exif=exif))
    assert decoded.image.shape == (64, 48, 3)
    assert np.array_equal(decoded.image, np.rot90(arr, k=-1))


def test_cmyk_jpeg_decodes_to_rgb():
    arr = _gradient()
    cmyk = Image.fromarray(arr).convert("CMYK")
    decoded = decode_image(_save(cmyk, "JPEG", quality=95))
    assert decoded.image.shape == (48, 64, 3) and decoded.source_mode == "CMYK"
    assert psnr(decoded.image, arr) > 25


def test_16bit_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16)[None, :].repeat(8, axis=0)
    decoded = decode_image(_save(Image.fromarray(ramp), "PNG"))
    grey = decoded.image[..., 0].astype(int)
    assert grey[0, 0] == 0 and grey[0, -1] == 255
    assert abs(grey[0, 128] - 128) <= 2  # mid-range maps to mid-grey, not to 255


def test_palette_png_with_transparency_gives_mask():
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    img.paste(1, (8, 8, 24, 24))
    decoded = decode_image(_save(img, "PNG", transparency=0))
    assert decoded.alpha.shape == (32, 32)
    assert decoded.alpha[16, 16] == 255 and decoded.alpha[0, 0] == 0
    assert tuple(decoded.image[0, 0]) == (255, 255, 255)  # transparent -> white
    assert tuple(decoded.image[16, 16]) == (200, 30, 30)


def test_decompression_bomb_refused_from_header():
    img = Image.new("L", (5000, 5000))
    with pytest.raises(OpInputError, match="max_pixels"):
        decode_image(_save(img, "PNG"), max_pixels=10_000_000)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
        (b"sku,title\nabc,def\n", "text"),
    ],
)
def test_non_images_name_what_they_are(data, message):
    with pytest.raises(OpInputError, match=message):
        decode_image(data)


def test_truncated_jpeg_is_an_input_error():
    data = _save(Image.fromarray(_gradient(256, 256)), "JPEG", quality=90)
    with pytest.raises(OpInputError, match="damaged or truncated"):
        decode_image(data[: len(data) // 3])


def test_animated_gif_takes_first_frame_and_says_so():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(data)
    assert decoded.image[8, 8, 0] > 200 and decoded.image[8, 8, 2] < 50
    assert any("first frame" in n for n in decoded.notes)


def test_encode_roundtrip_formats():
    arr = _gradient()
    for fmt in ("PNG", "JPEG", "WEBP"):
        back = decode_image(encode_image(arr, fmt, 95)).image
        assert psnr(back, arr) > (100 if fmt == "PNG" else 30)
    with pytest.raises(OpInputError, match="unknown output format"):
        encode_image(arr, "BMP")


def test_alpha_output_is_rgba_and_jpeg_refuses_it():
    arr = _gradient()
    alpha = np.zeros(arr.shape[:2], np.uint8)
    alpha[8:40, 10:50] = 255
    alpha[8:40, 10] = 128  # a soft edge column
    png = Image.open(io.BytesIO(encode_image(arr, "PNG", alpha=alpha)))
    assert png.mode == "RGBA" and np.array_equal(np.asarray(png)[..., 3], alpha)
    rgba = np.asarray(png)
    assert (rgba[alpha == 0][:, :3] == 0).all() and np.array_equal(rgba[alpha == 255][:, :3], arr[alpha == 255])
    webp = np.asarray(Image.open(io.BytesIO(encode_image(arr, "WEBP", 95, alpha=alpha))))
    assert webp.shape[2] == 4 and np.abs(webp[..., 3].astype(int) - alpha).max() <= 2
    with pytest.raises(OpInputError, match="JPEG has no alpha channel"):
        encode_image(arr, "JPEG", alpha=alpha)
    with pytest.raises(OpInputError, match="alpha is 3x3"):
        encode_image(arr, "PNG", alpha=np.zeros((3, 3), np.uint8))


def test_an_opaque_alpha_with_a_transparent_rim_is_not_a_cutout():
    rgba = np.dstack([_gradient(200, 200), np.full((200, 200), 255, np.uint8)])
    rgba[0, :, 3] = 0  # one transparent row: 0.5% of the frame
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    decoded = decode_image(buf.getvalue())
    assert decoded.alpha.size == 0 and any("alpha channel ignored" in n for n in decoded.notes)
    rgba[:, :20, 3] = 0  # a real cutout: 10% transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    assert decode_image(buf.getvalue()).alpha.shape == (200, 200)
