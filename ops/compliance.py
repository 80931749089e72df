"""Marketplace compliance: each channel's rules as data (`ops/channels/*.yaml`), evaluated on
the encoded output of every variant.

A rule names a check and its parameters; `level: recommended` rules are reported but do not
fail the channel. Results are one boolean column per rule, `compliance_<channel>_<rule>`, one
per channel, `compliance_<channel>` (all required rules pass), and `compliance_notes`, the
reasons of every failed rule ("amazon_main.fill: ...").

The product's extent comes from the variant's product mask when it has one, else from the
pixels that are not background-white: both are what a marketplace reviewer would see.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import yaml

from ops.base import has_mask
from ops.geometry import mask_bbox
from ops.overlay import detect_overlay

CHANNELS_DIR = Path(__file__).parent / "channels"
NON_WHITE = 245  # a pixel with any channel below this is "not background" for mask-less images


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    check: str
    params: dict[str, Any]
    required: bool


@dataclasses.dataclass(frozen=True)
class Channel:
    name: str
    rules: tuple[Rule, ...]
    fit: dict[str, Any]


@dataclasses.dataclass
class Subject:
    """What the checks look at: the decoded output, its product mask, the encoded file."""

    image: np.ndarray
    mask: np.ndarray  # uint8 0..255 product mask, or NO_MASK
    fmt: str
    n_bytes: int
    ai_generated: bool = False
    ai_labelled: bool = False

    @functools.cached_property
    def product(self) -> np.ndarray:
        if has_mask(self.mask) and self.mask.shape == self.image.shape[:2]:
            return (self.mask >= 128).astype(np.uint8)
        return (self.darkest < NON_WHITE).astype(np.uint8)

    @functools.cached_property
    def bbox(self) -> tuple[int, int, int, int] | None:
        return mask_bbox(self.product * 255)

    @functools.cached_property
    def darkest(self) -> np.ndarray:
        """Per pixel, the lowest of R, G, B (a pixel is white only if all three are). Two
        elementwise minimums: numpy's min over the last axis of HxWx3 is ~10x slower."""
        img = self.image
        return np.minimum(np.minimum(img[..., 0], img[..., 1]), img[..., 2])

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """One computation per subject for work several channels' rules share (two channels
        ask for the same overlay scan; every white-background rule grows the same mask)."""
        cache = self.__dict__.setdefault("_memo", {})
        if key not in cache:
            cache[key] = compute()
        return cache[key]


@functools.cache
def channels() -> dict[str, Channel]:
    out = {}
    for path in sorted(CHANNELS_DIR.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        rules = []
        for name, r in spec["rules"].items():
            params = {k: v for k, v in r.items() if k not in ("check", "level")}
            if r["check"] not in CHECKS:
                raise ValueError(f"{path}: rule {name!r} uses unknown check {r['check']!r}; known: {sorted(CHECKS)}")
            rules.append(Rule(name, r["check"], params, r.get("level", "required") == "required"))
        out[spec["channel"]] = Channel(spec["channel"], tuple(rules), spec.get("fit", {}))
    return out


def compliance_columns() -> list[str]:
    cols = []
    for ch in channels().values():
        cols.append(f"compliance_{ch.name}")
        cols += [f"compliance_{ch.name}_{r.name}" for r in ch.rules]
    return cols


def evaluate(subject: Subject, only: list[str] | None = None) -> dict[str, Any]:
    """{column: bool} for every channel's rules, plus `compliance_notes` (failed rules' reasons)."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    for ch in channels().values():
        if only is not None and ch.name not in only:
            continue
        ok = True
        for rule in ch.rules:
            try:
                reason = CHECKS[rule.check](subject, **rule.params)
            except Exception as exc:  # noqa: BLE001 - a check that cannot run fails its rule, not the row
                reason = f"could not be checked ({type(exc).__name__}: {exc})"
            out[f"compliance_{ch.name}_{rule.name}"] = reason is None
            if reason is not None:
                notes.append(f"{ch.name}.{rule.name}{'' if rule.required else ' (recommended)'}: {reason}")
                ok = ok and not rule.required
        out[f"compliance_{ch.name}"] = ok
    out["compliance_notes"] = notes
    return out


# ------------------------------------------------------------------------------- checks
# Each returns None when the rule passes, else a reason naming the measured value.


def _white_background(s: Subject, border_px: int, min_value: int, max_off_fraction: float) -> str | None:
    img = s.image
    h, w = img.shape[:2]
    b = max(1, min(border_px, h // 4, w // 4))
    ring = np.ones((h, w), bool)
    ring[b:-b, b:-b] = False
    # Outside the product: the ring, plus everything off the (slightly grown) product mask.
    outside = ring
    if has_mask(s.mask) and s.mask.shape == (h, w):
        # The product's soft edge (any alpha) and the few pixels of blend and sharpening
        # halo around it belong to the product, not the background.
        r = max(3, round(0.005 * max(h, w)))
        outside = ring | ~s.memo(("grown", r), lambda: _grown_mask(s.mask, r))
    off = s.darkest < min_value
    frac_ring = float(off[ring].mean())
    frac_out = float(off[outside].mean()) if outside.any() else 0.0
    worst = max(frac_ring, frac_out)
    if worst > max_off_fraction:
        where = "along the border" if frac_ring >= frac_out else "around the product"
        level = int(np.median(s.darkest[ring]))
        return f"background is not white {where}: {worst:.1%} of pixels below RGB {min_value} (border median {level}); compose on [255, 255, 255]"
    return None


def _grown_mask(mask: np.ndarray, r: int) -> np.ndarray:
    """mask > 0 dilated by a disc of radius r. A disc dilation is slow at large r, so it runs
    on the mask's box only (a dilation cannot reach further than r outside it)."""
    out = np.zeros(mask.shape, bool)
    box = mask_bbox(mask, threshold=1)
    if box is None:
        return out
    h, w = mask.shape
    x0, y0, x1, y1 = max(0, box[0] - r), max(0, box[1] - r), min(w, box[2] + r), min(h, box[3] + r)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)
    out[y0:y1, x0:x1] = cv2.dilate((mask[y0:y1, x0:x1] > 0).astype(np.uint8), disc) > 0
    return out


def _product_fill(s: Subject, min: float) -> str | None:  # noqa: A002 - rule parameter name
    if s.bbox is None:
        return "no product found (the image is all white)"
    x0, y0, x1, y1 = s.bbox
    h, w = s.image.shape[:2]
    fill = max(x1 - x0, y1 - y0) / max(h, w)
    if fill < min:
        return f"product fills {fill:.0%} of the frame's longer side, needs >= {min:.0%}"
    return None


def _long_side(s: Subject, min: int) -> str | None:  # noqa: A002
    side = max(s.image.shape[:2])
    return None if side >= min else f"longest side is {side} px, needs >= {min} px"


def _min_size(s: Subject, width: int, height: int) -> str | None:
    h, w = s.image.shape[:2]
    return None if w >= width and h >= height else f"image is {w}x{h} px, needs >= {width}x{height}"


def _max_megapixels(s: Subject, max: float) -> str | None:  # noqa: A002
    mp = s.image.shape[0] * s.image.shape[1] / 1e6
    return None if mp <= max else f"image is {mp:.1f} megapixels, over {max:g}"


def _max_file_mb(s: Subject, max: float) -> str | None:  # noqa: A002
    mb = s.n_bytes / 2**20
    return None if mb <= max else f"file is {mb:.1f} MB, over {max:g} MB; lower the output quality or size"


def _format(s: Subject, allowed: list[str]) -> str | None:
    return None if s.fmt.upper() in allowed else f"format {s.fmt} is not one of {', '.join(allowed)}"


def _aspect(s: Subject, ratio: float, tolerance: float) -> str | None:
    h, w = s.image.shape[:2]
    r = w / h
    return None if abs(r - ratio) <= tolerance * ratio else f"aspect {w}x{h} ({r:.3f}) is not {ratio:g}"


def _no_overlay(s: Subject, max_fraction: float, reference_sides: tuple[int, ...] = (1024, 512)) -> str | None:
    worst = s.memo(("overlay", tuple(reference_sides)), lambda: _overlay_fraction(s, reference_sides))
    return None if worst <= max_fraction else f"text or watermark strokes cover {worst:.2%} of the image (limit {max_fraction:.2%})"


def _overlay_fraction(s: Subject, reference_sides: tuple[int, ...]) -> float:
    """Share of the frame covered by overlaid text/watermark strokes over the background. The
    detector's stroke-width limits are in pixels, so it looks at a few reference resolutions
    (big text shows at the small one, small text at the large one) and the worst counts."""
    worst = 0.0
    for side in reference_sides:
        image, product = s.image, s.product
        scale = side / max(image.shape[:2])
        if scale < 1:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            product = cv2.resize(product, size, interpolation=cv2.INTER_NEAREST)
        found = detect_overlay(image) > 0
        # With a product mask, text printed on the product (a label) is the product's; only
        # strokes over the background count. Without one, the whole frame counts.
        if has_mask(s.mask):
            found &= cv2.dilate(product, np.ones((9, 9), np.uint8)) == 0
        worst = max(worst, float(found.mean()))
    return worst


def _not_cropped(s: Subject, margin_px: int) -> str | None:
    if s.bbox is None:
        return "no product found (the image is all white)"
    x0, y0, x1, y1 = s.bbox
    h, w = s.image.shape[:2]
    edges = [name for name, d in (("left", x0), ("top", y0), ("right", w - x1), ("bottom", h - y1)) if d < margin_px]
    return None if not edges else f"product touches the frame ({', '.join(edges)} edge): it looks cropped"


def _no_border(s: Subject, max_band: float, min_contrast: float, min_sides: int) -> str | None:
    """A frame: on `min_sides` edges, a flat band (2 px up to `max_band` of the side) of one
    colour, followed by pixels that differ from it by `min_contrast`."""
    img = s.image
    h, w = img.shape[:2]
    if min(h, w) < 16:
        return None  # too small to carry a frame
    t = img.transpose(1, 0, 2)
    strips = {"top": img, "bottom": img[::-1], "left": t, "right": t[::-1]}
    framed = []
    for side, strip in strips.items():
        limit = max(3, int(max_band * (h if side in ("top", "bottom") else w)))
        width, off_at_width = _flat_band(strip, limit)
        if 2 <= width < limit and off_at_width >= min_contrast:
            framed.append(f"{side} {width}px")
    if len(framed) >= min_sides:
        return f"the image has a border ({', '.join(framed)}); remove the frame"
    return None


def _flat_band(strip: np.ndarray, limit: int) -> tuple[int, float]:
    """(width, off): how many lines from the strip's edge are flat (spread < 6, mean within 8
    of the first line's), up to `limit`, and the first non-flat line's colour distance from
    the first line. Lines are measured a few at a time, growing, so a photo whose first lines
    already vary (most of them) costs a few lines, not the whole band; a white margin still
    walks to its end."""
    first = None
    start, step = 0, 8
    while start < limit:
        lines = strip[start : min(limit, start + step)].astype(np.float32)
        means, spread = lines.mean(axis=1), lines.std(axis=1).max(axis=1)
        if first is None:
            first = means[0]
        off = np.abs(means - first).max(axis=1)
        flat = (spread < 6) & (off < 8)
        if not flat.all():
            k = int(np.argmin(flat))
            return start + k, float(off[k])
        start += len(flat)
        step *= 2
    return limit, 0.0


def _ai_labelled(s: Subject) -> str | None:
    if s.ai_generated and not s.ai_labelled:
        return "AI-generated image without IPTC DigitalSourceType trainedAlgorithmicMedia in its metadata"
    return None


CHECKS: dict[str, Callable[..., str | None]] = {
    "white_background": _white_background,
    "product_fill": _product_fill,
    "long_side": _long_side,
    "min_size": _min_size,
    "max_megapixels": _max_megapixels,
    "max_file_mb": _max_file_mb,
    "format": _format,
    "aspect": _aspect,
    "no_overlay": _no_overlay,
    "not_cropped": _not_cropped,
    "no_border": _no_border,
    "ai_labelled": _ai_labelled,
}
