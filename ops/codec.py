"""Decode product photos into sRGB uint8 arrays, and encode outputs.

Decoding is where hostile input arrives, so every failure is an `OpInputError` whose message
names what was wrong and what to do, and the pixel guard runs on the header before any
pixel data is decompressed.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from ops.base import NO_MASK, OpInputError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: well above any catalog photo, far below a bomb
# An alpha channel is a product cutout only when at least this share of the frame is transparent.
MIN_CUTOUT_TRANSPARENCY = 0.01

# PIL's own bomb check raises at 2x its limit and only warns below; we check ourselves on the
# header with the configured limit, so disable PIL's to get one consistent message.
Image.MAX_IMAGE_PIXELS = None

_SRGB = ImageCms.createProfile("sRGB")


@dataclasses.dataclass(frozen=True)
class Decoded:
    image: np.ndarray  # HxWx3 uint8, sRGB
    alpha: np.ndarray  # HxW uint8 when the source is a cutout (>= 1% transparent), else NO_MASK
    source_format: str
    source_mode: str
    notes: tuple[str, ...] = ()


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, background=(255, 255, 255)) -> Decoded:
    """Decode bytes to upright sRGB. Transparent sources are flattened onto `background`."""
    if not data:
        raise OpInputError("the file is empty (0 bytes); check the upload that produced it")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise OpInputError(f"not an image file ({_sniff(data)}); the URI must point at a JPEG, PNG, WebP, GIF or TIFF") from None

    width, height = img.size
    if width * height > max_pixels:
        raise OpInputError(
            f"image declares {width}x{height} = {width * height:,} pixels, over the max_pixels guard of {max_pixels:,}; "
            "if the photo is genuine, raise decode.max_pixels in the run config"
        )
    if width < 1 or height < 1:
        raise OpInputError(f"image has no pixels ({width}x{height})")

    notes = []
    if getattr(img, "n_frames", 1) > 1:
        notes.append(f"animated {img.format} with {img.n_frames} frames: used the first frame")
    source_format, source_mode = img.format or "unknown", img.mode
    icc = img.info.get("icc_profile")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise OpInputError(f"the {source_format} data is damaged or truncated ({exc}); re-export the photo") from None

    rgb, alpha = _to_srgb(img, icc)
    mask = NO_MASK
    if alpha is not None:
        bg = Image.new("RGB", rgb.size, tuple(background))
        bg.paste(rgb, mask=alpha)
        rgb = bg
        mask = np.asarray(alpha, dtype=np.uint8).copy()
        transparent = float(np.mean(mask < 128))
        if transparent < MIN_CUTOUT_TRANSPARENCY:
            # Opaque but for a rim or a corner: not a cutout, so the product mask must come
            # from segmentation rather than from this alpha.
            notes.append(f"alpha channel ignored as a mask: only {transparent:.2%} of the pixels are transparent")
            mask = NO_MASK
    return Decoded(
        image=np.asarray(rgb, dtype=np.uint8).copy(),
        alpha=mask,
        source_format=source_format,
        source_mode=source_mode,
        notes=tuple(notes),
    )


def _to_srgb(img: Image.Image, icc: bytes | None) -> tuple[Image.Image, Image.Image | None]:
    """Convert any PIL mode to RGB (colour-managed when an ICC profile is embedded) + alpha."""
    alpha = None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale the full range down to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "1":
        img = img.convert("L")

    if img.mode == "RGBA":
        alpha = img.getchannel("A")
        if alpha.getextrema() == (255, 255):
            alpha = None
        img = img.convert("RGB")

    if icc and img.mode in ("RGB", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            img = ImageCms.profileToProfile(img, src, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            img = img.convert("RGB")  # a broken profile is not worth failing the row over
    if img.mode != "RGB":
        # Without a profile, CMYK falls back to PIL's conversion (PIL already un-inverts
        # Adobe's inverted CMYK JPEGs on load, so this is right for both kinds).
        img = img.convert("RGB")
    return img, alpha


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page, e.g. an error page saved as an image"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "looks like XML/SVG, which is not supported"
    try:
        data[:256].decode("utf-8")
        return "looks like text"
    except UnicodeDecodeError:
        return f"unknown binary format, first bytes {data[:8].hex()}"


FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def encode_image(image: np.ndarray, fmt: str = "JPEG", quality: int = 92, xmp: bytes | None = None, alpha: np.ndarray | None = None) -> bytes:
    """Encode an RGB uint8 array, with an XMP packet when given (JPEG APP1, WebP XMP chunk,
    PNG iTXt 'XML:com.adobe.xmp'). JPEG uses 4:4:4 above quality 90 to keep label text crisp.
    With `alpha` (H x W uint8, e.g. the soft product matte) PNG and WebP are written as RGBA;
    fully transparent pixels are zeroed so the file carries no hidden backdrop."""
    pil_format = FORMATS.get(fmt.lower())
    if pil_format is None:
        raise OpInputError(f"unknown output format {fmt!r}; use one of JPEG, PNG, WEBP")
    buf = io.BytesIO()
    if alpha is not None:
        if pil_format == "JPEG":
            raise OpInputError("JPEG has no alpha channel; write PNG or WEBP for a transparent cutout")
        if alpha.shape != image.shape[:2]:
            raise OpInputError(f"alpha is {alpha.shape[1]}x{alpha.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}")
        rgba = np.dstack([np.where(alpha[..., None] > 0, image, 0).astype(np.uint8), alpha])
        img = Image.fromarray(rgba, "RGBA")
    else:
        img = Image.fromarray(image, "RGB")
    extra = {"xmp": xmp} if xmp else {}
    if pil_format == "JPEG":
        img.save(buf, "JPEG", quality=quality, optimize=True, subsampling=0 if quality >= 90 else 2, **extra)
    elif pil_format == "WEBP":
        img.save(buf, "WEBP", quality=quality, method=4, alpha_quality=100, **extra)
    else:
        from PIL.PngImagePlugin import PngInfo

        info = None
        if xmp:
            info = PngInfo()
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"))
        img.save(buf, "PNG", compress_level=6, pnginfo=info)
    return buf.getvalue()
