"""Provenance: the XMP label and the invisible watermark are read back from the written file,
and the watermark survives JPEG re-encoding at quality 85."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ops.codec import decode_image, encode_image
from ops.metrics import psnr
from ops.provenance import DIGITAL_SOURCE_TYPE, Label, embed_watermark, read_watermark, read_xmp, watermark_id
from pipelines.sample_catalog import render_product


def _reencode(data: bytes, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_watermark_is_invisible_and_survives_jpeg_85(seed):
    photo = render_product(seed, size=(768, 768)).photo
    wid = watermark_id("run-1", f"SKU-{seed}", "studio", 0)
    marked = embed_watermark(photo, wid)
    assert psnr(marked, photo) > 38
    once = encode_image(marked, "JPEG", 92)
    assert read_watermark(decode_image(once).image) == wid
    twice = _reencode(once, 85)
    assert read_watermark(decode_image(twice).image) == wid


def test_unmarked_images_have_no_watermark():
    for seed in range(6):
        assert read_watermark(render_product(seed, size=(512, 512)).photo) is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_xmp_label_round_trips_in_every_output_format(fmt):
    label = Label(run_id="2026-11-22", sku='A&B "x"', recipe="studio", variant=1, watermark_id=0xDEADBEEF)
    data = encode_image(render_product(1, size=(128, 128)).photo, fmt, 90, xmp=label.xmp())
    got = read_xmp(data)
    assert got["Iptc4xmpExt:DigitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert got["skustudio:sku"] == 'A&B "x"' and got["skustudio:variant"] == "1" and got["skustudio:watermark"] == "deadbeef"
    assert read_xmp(encode_image(render_product(1, size=(128, 128)).photo, fmt, 90)) == {}
