"""The bad-input corpus: files and manifest rows a real catalog throws at the pipeline, each
with the outcome it must have (variants, or an error row whose message says why)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, features

from pipelines.sample_catalog import render_product


@dataclasses.dataclass
class Case:
    sku: str
    key: str | None  # object key under the corpus bucket's img/ (None: the row names no upload)
    data: bytes | None  # uploaded bytes (None: nothing uploaded, e.g. the 404 case)
    expect: str  # 'ok', or a substring the error message must contain
    stage: str | None = None  # the error stage, when expect is an error


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _product(seed: int, size=(256, 256)) -> np.ndarray:
    return render_product(seed, degradation="none", size=size).photo


def corpus() -> list[Case]:
    photo = _product(501)
    jpeg = _save(Image.fromarray(photo), "JPEG", quality=90)
    cases = [
        Case("GOOD-1", "good1.jpg", jpeg, "ok"),
        Case("GOOD-2", "good2.png", _save(Image.fromarray(_product(502)), "PNG"), "ok"),
        Case("ZERO", "zero.jpg", b"", "empty", "decode"),
        Case("TRUNC-JPEG", "trunc.jpg", jpeg[: len(jpeg) // 3], "damaged or truncated", "decode"),
        Case("HTML", "page.jpg", b"<!DOCTYPE html><html><body>Not found</body></html>", "HTML", "decode"),
        Case("TEXT", "notes.jpg", b"sku,title\nabc,def\n", "text", "decode"),
        Case("CMYK", "cmyk.jpg", _save(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=90), "ok"),
        Case("PNG16", "deep.png", _save(Image.fromarray((photo[..., 1].astype(np.uint16) * 257)), "PNG"), "ok"),
        Case("PALETTE", "pal.png", _palette_with_transparency(), "ok"),
        Case("EXIF-ROT", "rotated.jpg", _exif_rotated(), "ok"),
        Case("ONE-PX", "one.png", _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok"),
        Case("BOMB", "bomb.png", _save(Image.new("1", (12000, 12000)), "PNG", optimize=True), "max_pixels", "decode"),
        Case("GIF-ANIM", "anim.gif", _animated_gif(), "ok"),
        Case("WEBP", "photo.webp", _save(Image.fromarray(photo), "WEBP", quality=90), "ok"),
        Case("MISSING", "nope.jpg", None, "404", "fetch"),
        Case("DENIED", "denied/secret.jpg", jpeg, "403", "fetch"),
        Case("../../etc/x", "good1.jpg", None, "ok"),
        Case("a/b/c", "good1.jpg", None, "ok"),
        Case("ＳＫＵ-ü-😀", "good1.jpg", None, "ok"),
        Case("L" * 1000, "good1.jpg", None, "over the limit", "manifest"),
    ]
    if features.check("avif"):
        cases.append(Case("AVIF", "photo.avif", _save(Image.fromarray(photo), "AVIF", quality=80), "ok"))
    return cases


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    img.paste(1, (16, 16, 48, 48))
    return _save(img, "PNG", transparency=0)


def _exif_rotated() -> bytes:
    # A 2:1 landscape stored with orientation 6 (rotate 90 CW to view): upright is 1:2 portrait.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100] = (220, 40, 40)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", exif=exif.tobytes(), quality=95)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in ((220, 30, 30), (30, 30, 220))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
